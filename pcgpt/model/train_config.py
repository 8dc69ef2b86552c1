"""`pcgpt train`'s settings: the TrainConfig dataclass, the presets' defaults and their checks.

Kept apart from train.py and free of torch so that `pcgpt train --help` and a mistyped flag are
answered without importing PyTorch. Each field's metadata holds its help text and, where the
values are a fixed set, its choices: the command line is built from them (pcgpt/cli_train.py).
"""

import shlex
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

# pcgpt/model/gpt.py PRESETS' names (that module imports torch); tests/test_cli.py checks they agree
PRESET_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "char-small", "char-baby", "tiny")


def opt(default, help: str, choices=None, minimum=None):
    """A TrainConfig field with its help text, its allowed values (choices) or lower bound."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "UTF-8 text file: the first 90%% trains, the last 10%% validates (nanoGPT's split)"})
    out_dir: str = field(metadata={"help": "directory the checkpoint (best by validation loss) and train_state.pt go to"})
    model_type: str = opt("gpt", "gpt (baseline) or pc (predictive coding)", choices=("gpt", "pc"))
    init_from: str | None = opt(None, "checkpoint to start from (a baseline becomes a PC model's bottom-up path); "
                                      "default: from scratch")
    resume: bool = opt(False, "continue from OUT_DIR/train_state.pt (optimizer, step, random state)")
    preset: str = opt("char-small", "model shape when training from scratch", choices=PRESET_NAMES)
    tokenizer: str = opt("char", "char (the training text's characters) or gpt2 (BPE)", choices=("char", "gpt2"))
    dropout: float = opt(0.0, "dropout while training", minimum=0.0)
    max_iters: int = opt(2000, "optimizer steps", minimum=0)
    max_seconds: float = opt(0.0, "also stop (after a final evaluation) once training has run this long; 0 = off",
                             minimum=0.0)
    batch_size: int = opt(16, "sequences per micro-batch", minimum=1)
    block_size: int = opt(256, "sequence length while training", minimum=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", minimum=1)
    learning_rate: float = opt(1e-3, "peak learning rate", minimum=0.0)
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay", minimum=0.0)
    warmup_iters: int = opt(100, "linear warmup steps", minimum=0)
    lr_decay_iters: int | None = opt(None, "steps of cosine decay; default: MAX_ITERS", minimum=1)
    weight_decay: float = opt(0.1, "AdamW weight decay, on matrices only (not biases, LayerNorm or precisions)",
                              minimum=0.0)
    beta1: float = opt(0.9, "AdamW beta1", minimum=0.0)
    beta2: float = opt(0.99, "AdamW beta2", minimum=0.0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)", minimum=0.0)
    eval_interval: int = opt(250, "steps between evaluations (and best-checkpoint saves)", minimum=1)
    eval_iters: int = opt(20, "batches per split in each evaluation", minimum=1)
    seed: int = opt(1337, "random seed (batches, initialisation)")
    device: str = opt("auto", "auto (CUDA when present), cpu or cuda[:N]")
    dtype: str = opt("auto", "autocast dtype on GPU: auto (bf16 where supported), float32, bfloat16, float16; "
                             "CPU trains in float32", choices=("auto", "float32", "bfloat16", "float16"))
    threads: int = opt(0, "torch threads on CPU (0 = PyTorch's default)", minimum=0)
    # predictive coding (model_type "pc")
    pc_train: str = opt("all", "PC: train all parameters, or only the generators and precisions (the baseline "
                               "frozen)", choices=("all", "generators"))
    pc_learning: str = opt("backprop", "PC: backprop through unrolled settling, or local (each part from its own "
                                       "error)", choices=("backprop", "local"))
    pc_k_max: int = opt(2, "PC: unrolled settling steps are drawn from 0..K_MAX per batch", minimum=0)
    pc_lambda0: float = opt(0.5, "PC: weight of the unsettled prediction's loss (keeps T = 0 good)", minimum=0.0)
    pc_lambda_energy: float = opt(0.01, "PC: weight of the free energy at the detached settled states", minimum=0.0)
    pc_alpha: float = opt(0.25, "PC: settling step size while training", minimum=0.0)
    pc_default_settle_steps: int = opt(1, "PC: settle steps stored in the checkpoint as the serving default",
                                       minimum=0)
    pc_serve_alpha: float = opt(0.1, "PC: settling step size stored in the checkpoint (serving, evaluation)",
                                minimum=0.0)
    pc_error_law: str = opt("gaussian", "PC: law of the prediction errors (student_t learns its degrees of freedom "
                                        "per layer)", choices=("gaussian", "laplace", "student_t"))
    pc_ln_precision: bool = opt(False, "PC: measure errors in LayerNorm units (1/sigma of each state as its precision)")
    pc_attention_precision: bool = opt(False, "PC: weight attention's heads by learned per-head precisions")
    pc_rho_lr_scale: float = opt(0.1, "PC: the precisions' learning rate relative to the rest (at full speed "
                                      "they run away)", minimum=0.0)
    command: str = field(default="", repr=False)  # the command line that started this run, recorded in the checkpoint


# nanoGPT's train.py defaults for the GPT-2 shapes (its config/train_gpt2.py): 12 sequences × 5
# accumulation steps of 1024 tokens per device, lr 6e-4 with 2000 warmup steps and cosine decay to
# 6e-5, weight decay 0.1, clip 1.0, betas 0.9 / 0.95. A preset's defaults apply where the command
# line names no value of its own.
GPT2_TRAIN_DEFAULTS = dict(tokenizer="gpt2", block_size=1024, batch_size=12, grad_accum=5, learning_rate=6e-4,
                           min_lr=6e-5, warmup_iters=2000, max_iters=600_000, lr_decay_iters=600_000,
                           weight_decay=0.1, grad_clip=1.0, beta1=0.9, beta2=0.95, eval_interval=2000,
                           eval_iters=200, dropout=0.0)
PRESET_TRAIN_DEFAULTS = {name: GPT2_TRAIN_DEFAULTS for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


def train_config(given: dict) -> TrainConfig:
    """A TrainConfig from the values a user gave (None = not given): the preset's defaults first,
    then the dataclass's."""
    preset = given.get("preset") or TrainConfig.__dataclass_fields__["preset"].default
    values = {**PRESET_TRAIN_DEFAULTS.get(preset, {}), **{k: v for k, v in given.items() if v is not None}}
    return TrainConfig(**values)


def default_of(name: str):
    f = TrainConfig.__dataclass_fields__[name]
    return None if f.default is MISSING else f.default


def check_train_config(cfg: TrainConfig) -> None:
    """Raises ValueError naming the flag (--like-this) for a setting that cannot train: a value
    outside its choices or bounds, a missing file, a resume with nothing to resume."""
    def flag(name):
        return "--" + name.replace("_", "-")
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or not meta:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{flag(f.name)} {value!r}: must be one of {', '.join(meta['choices'])}")
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ValueError(f"{flag(f.name)} {value}: must be at least {meta['minimum']}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if not Path(cfg.data).is_file():
        raise ValueError(f"--data {cfg.data}: no such file")
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise ValueError(f"--init-from {cfg.init_from}: no such file or directory")
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {cfg.out_dir}: exists and is not a directory")
    if cfg.resume and not (out_dir / "train_state.pt").is_file():
        raise ValueError(f"--resume: {out_dir / 'train_state.pt'} does not exist (nothing to resume)")


def command_line() -> str:
    """This process's command line as `pcgpt ...`, recorded in the checkpoints it writes."""
    return " ".join(shlex.quote(a) for a in ["pcgpt", *sys.argv[1:]])
