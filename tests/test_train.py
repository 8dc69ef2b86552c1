"""Training configuration: nanoGPT's defaults for the GPT-2 presets, the command line's values win."""

from pcgpt.model.train import TrainConfig, lr_at, train_config


def test_gpt2_preset_takes_nanogpts_defaults():
    cfg = train_config({"data": "x.txt", "out_dir": "out", "preset": "gpt2"})
    assert (cfg.learning_rate, cfg.warmup_iters, cfg.batch_size, cfg.grad_accum) == (6e-4, 2000, 12, 5)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.beta1, cfg.beta2) == (0.1, 1.0, 0.9, 0.95)
    assert cfg.block_size == 1024 and cfg.tokenizer == "gpt2"


def test_given_values_beat_the_preset_and_char_presets_keep_the_dataclass_defaults():
    cfg = train_config({"data": "x.txt", "out_dir": "out", "preset": "gpt2", "learning_rate": 1e-3, "batch_size": None})
    assert cfg.learning_rate == 1e-3 and cfg.batch_size == 12
    char = train_config({"data": "x.txt", "out_dir": "out"})
    assert char == TrainConfig(data="x.txt", out_dir="out")


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(data="x", out_dir="o", learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    warm = [lr_at(i, cfg) for i in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:])) and warm[-1] <= 1.0
    decay = [lr_at(i, cfg) for i in range(10, 111)]
    assert abs(decay[0] - 1.0) < 1e-9 and abs(decay[-1] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert abs(lr_at(60, cfg) - 0.55) < 1e-9  # halfway down the cosine
