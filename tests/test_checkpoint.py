"""Checkpoint IO: pcgpt directories round-trip, nanoGPT's ckpt.pt + meta.pkl load as nanoGPT
writes them, pickles that would run code are refused, and every corrupt or mismatched checkpoint
fails with a CheckpointError naming the file and the problem, both when loaded and when only its
info is read (read_checkpoint_info: config, tokenizer, metadata and tensor index, no weights)."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pcgpt.model.checkpoint import (HF_TRANSPOSED, CheckpointError, detect_format, load_checkpoint,
                                      read_checkpoint_info, save_pcgpt)
from pcgpt.model.generate import generate
from pcgpt.model.gpt import GPT, preset_config
from pcgpt.model.sampling import SamplingParams
from pcgpt.model.tokenizer import CharTokenizer, gpt2_tokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nROMEO:\nBut, soft! what light "
        "through yonder window breaks? It is the east, and Juliet is the sun. Quoth I; 'zounds, 3 & $-!")
PCGPT = Path(sys.executable).parent / "pcgpt"




def char_model(seed=0, bias=True):
    """A tiny model whose vocabulary is exactly TEXT's characters (as nanoGPT's shakespeare_char)."""
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(seed)
    model = GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval(), tokenizer


@torch.no_grad()
def logits_of(model, text_ids):
    return model(torch.tensor([text_ids]))


def run_cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(PCGPT), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def greedy_text(model, tokenizer, prompt, n):
    ids = [t for t, _, _ in generate(model, tokenizer.encode(prompt), n, SamplingParams(temperature=0))]
    return tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------
# pcgpt directory


@pytest.mark.parametrize("tok", ["char", "gpt2"])
def test_pcgpt_round_trip(tmp_path, tok):
    if tok == "char":
        model, tokenizer = char_model()
    else:
        tokenizer = gpt2_tokenizer()
        torch.manual_seed(0)
        model = GPT(preset_config("tiny", vocab_size=50257, bias=False)).eval()
    meta = {"training": {"iter_num": 123, "dataset": "shakespeare_char"}, "eval": {"val_loss": 1.61}}
    save_pcgpt(tmp_path / "m", model, tokenizer, metadata=meta)

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "pcgpt" and config["model_type"] == "gpt"
    assert config["model_args"] == model.config.to_dict()
    assert config["tokenizer"] == tokenizer.to_spec()
    # weights are safetensors (no pickle); the tied head is stored once
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored

    loaded, loaded_tok, metadata = load_checkpoint(tmp_path / "m")
    assert detect_format(tmp_path / "m") == "pcgpt"
    assert metadata["format"] == "pcgpt" and metadata["model_type"] == "gpt"
    assert metadata["training"] == meta["training"] and metadata["eval"] == meta["eval"]
    assert loaded_tok.to_spec() == tokenizer.to_spec()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = loaded_tok.encode("ROMEO:\nBut, soft!")
    assert tokenizer.encode("ROMEO:\nBut, soft!") == ids
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


# ---------------------------------------------------------------------------------------------
# nanoGPT ckpt.pt + meta.pkl


def write_nanogpt(out_dir: Path, model, tokenizer, with_meta=True, mask_buffers=True):
    """ckpt.pt exactly as nanoGPT's train.py writes it after torch.compile, and meta.pkl as
    data/shakespeare_char/prepare.py writes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                      bias=c.bias, vocab_size=None, dropout=0.0)
    model_args["vocab_size"] = tokenizer.vocab_size  # train.py fills it in from meta.pkl
    # one AdamW step, with nanoGPT's two parameter groups (decay for >= 2-D tensors)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ], lr=1e-3, betas=(0.9, 0.99))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor([tokenizer.encode(TEXT[:33])])
    model.train()
    loss, _ = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():  # keep the weights the test compares against; the optimizer state stays
        for k, v in model.state_dict().items():
            v.copy_(snapshot[k])
    # torch.compile'd module: raw_model.state_dict() keys carry "_orig_mod."
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    if mask_buffers:  # older nanoGPT registered the causal mask as a buffer named "bias"
        for i in range(c.n_layer):
            state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(
                torch.ones(c.block_size, c.block_size)).view(1, 1, c.block_size, c.block_size)
    config = dict(out_dir="out-shakespeare-char", eval_interval=250, log_interval=10, eval_iters=200,
                  eval_only=False, always_save_checkpoint=False, init_from="scratch", wandb_log=False,
                  wandb_project="shakespeare-char", wandb_run_name="mini-gpt", dataset="shakespeare_char",
                  gradient_accumulation_steps=1, batch_size=64, block_size=c.block_size, n_layer=c.n_layer,
                  n_head=c.n_head, n_embd=c.n_embd, dropout=0.2, bias=c.bias, learning_rate=1e-3,
                  max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, decay_lr=True,
                  warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4, backend="nccl", device="cpu",
                  dtype="float32", compile=True)
    checkpoint = {"model": state, "optimizer": optimizer.state_dict(), "model_args": model_args,
                  "iter_num": 10, "best_val_loss": torch.tensor(1.5), "config": config}
    torch.save(checkpoint, out_dir / "ckpt.pt")
    if with_meta:
        write_meta(out_dir / "meta.pkl", TEXT)
    return out_dir / "ckpt.pt"


def write_meta(path: Path, data: str):
    chars = sorted(list(set(data)))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    meta = {"vocab_size": vocab_size, "itos": itos, "stoi": stoi}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(meta, f)


@pytest.mark.parametrize("bias", [False, True])
def test_nanogpt_ckpt_loads(tmp_path, bias):
    model, tokenizer = char_model(bias=bias)
    ckpt = write_nanogpt(tmp_path / "out", model, tokenizer)
    assert detect_format(ckpt) == "nanogpt"
    loaded, tok, metadata = load_checkpoint(ckpt)
    assert tok.name == "char" and tok.to_spec() == tokenizer.to_spec()
    assert loaded.config.bias == bias and loaded.config.vocab_size == tokenizer.vocab_size
    assert metadata["format"] == "nanogpt"
    assert metadata["training"] == {"iter_num": 10, "best_val_loss": 1.5, "dataset": "shakespeare_char"}
    ids = tok.encode(TEXT[:40])
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


def test_nanogpt_meta_found_explicitly_or_under_data(tmp_path):
    model, tokenizer = char_model()
    ckpt = write_nanogpt(tmp_path / "out", model, tokenizer, with_meta=False)
    # without a meta.pkl the GPT-2 BPE would be used, which does not fit a 65-char model
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(ckpt)
    write_meta(tmp_path / "elsewhere" / "meta.pkl", TEXT)
    _, tok, _ = load_checkpoint(ckpt, meta_path=tmp_path / "elsewhere" / "meta.pkl")
    assert tok.to_spec() == tokenizer.to_spec()
    with pytest.raises(CheckpointError, match="nope.pkl"):
        load_checkpoint(ckpt, meta_path=tmp_path / "nope.pkl")
    # nanoGPT's sample.py layout: data/<dataset>/meta.pkl
    write_meta(tmp_path / "out" / "data" / "shakespeare_char" / "meta.pkl", TEXT)
    _, tok, _ = load_checkpoint(ckpt)
    assert tok.to_spec() == tokenizer.to_spec()


def test_nanogpt_generate_cli(tmp_path):
    model, tokenizer = char_model()
    ckpt = write_nanogpt(tmp_path / "out", model, tokenizer)
    prompt = "ROMEO:\n"
    expected = prompt + greedy_text(model, tokenizer, prompt, 10) + "\n"
    assert len(expected) == len(prompt) + 11

    r = run_cli("generate", "--model", ckpt, "--prompt", prompt, "--max-tokens", 10, "--temperature", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected

    # meta.pkl from another folder, given with --meta
    (tmp_path / "out" / "meta.pkl").rename(tmp_path / "vocab.pkl")
    r = run_cli("generate", "--model", ckpt, "--meta", tmp_path / "vocab.pkl", "--prompt", prompt,
                "--max-tokens", 10, "--temperature", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected


# ---------------------------------------------------------------------------------------------
# pickles that would run code


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_payload_is_live(tmp_path):
    """The control: unpickled naively, the payload of the refusal tests does run."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.read_text() == "code ran"


def _evil_files(tmp_path, marker):
    """(file, which path to load, meta_path) for each way a pickle could smuggle code."""
    model, tokenizer = char_model()
    cases = []
    d = tmp_path / "torchsave"
    d.mkdir()
    torch.save({"model": {"x": _RunsCode(marker)}, "model_args": {}}, d / "ckpt.pt")
    cases.append(("torch.save", d / "ckpt.pt", d / "ckpt.pt", None))
    d = tmp_path / "rawpickle"
    d.mkdir()
    (d / "ckpt.pt").write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    cases.append(("raw pickle", d / "ckpt.pt", d / "ckpt.pt", None))
    d = tmp_path / "meta-beside"
    ckpt = write_nanogpt(d, model, tokenizer, with_meta=False)
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 2, "itos": _RunsCode(marker), "stoi": {}}))
    cases.append(("meta.pkl beside", d / "meta.pkl", ckpt, None))
    (tmp_path / "evil_meta.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    cases.append(("meta.pkl given", tmp_path / "evil_meta.pkl", ckpt, tmp_path / "evil_meta.pkl"))
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                               "n_positions": 16, "vocab_size": 50257}))
    torch.save({"wte.weight": _RunsCode(marker)}, d / "pytorch_model.bin")
    cases.append(("HF pytorch_model.bin", d / "pytorch_model.bin", d, None))
    return cases


def test_code_running_pickles_are_refused(tmp_path):
    marker = tmp_path / "marker"
    for what, bad_file, path, meta in _evil_files(tmp_path, marker):
        for read in (load_checkpoint, read_checkpoint_info):
            with pytest.raises(CheckpointError) as e:
                read(path, meta_path=meta)
            assert str(bad_file) in str(e.value), (what, read.__name__)
            assert "exec" in str(e.value), (what, read.__name__)  # names what it refused
            assert not marker.exists(), (what, read.__name__)


def test_code_running_pickles_are_refused_by_cli(tmp_path):
    marker = tmp_path / "marker"
    cases = _evil_files(tmp_path, marker)
    for what, bad_file, path, meta in [cases[0], cases[2]]:  # one ckpt.pt, one meta.pkl: each CLI run starts torch
        extra = ["--meta", meta] if meta else []
        r = run_cli("generate", "--model", path, *extra, "--prompt", "a", "--max-tokens", 3, cwd=tmp_path)
        assert r.returncode != 0, what
        assert str(bad_file) in r.stderr, what
        assert "Traceback" not in r.stderr, what
        assert r.stdout == "", what
        assert not marker.exists(), what


# ---------------------------------------------------------------------------------------------
# corrupt and mismatched checkpoints


@pytest.fixture
def saved(tmp_path):
    model, tokenizer = char_model()
    return save_pcgpt(tmp_path / "m", model, tokenizer)


def _error(path, **kw) -> str:
    """The CheckpointError's message; reading only the info fails the same way as loading."""
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kw)
    with pytest.raises(CheckpointError) as info_error:
        read_checkpoint_info(path, **kw)
    assert str(info_error.value) == str(e.value)
    return str(e.value)


def test_truncated_safetensors(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    msg = _error(saved)
    assert str(weights) in msg and "truncated" in msg


def test_truncated_ckpt_pt(tmp_path):
    model, tokenizer = char_model()
    ckpt = write_nanogpt(tmp_path / "out", model, tokenizer)
    data = ckpt.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        ckpt.write_bytes(data[:cut])
        msg = _error(ckpt)
        assert str(ckpt) in msg and ("truncated" in msg or "corrupt" in msg), msg


def test_missing_tensor(saved, tmp_path):
    weights = saved / "model.safetensors"
    state = load_file(weights)
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, weights)
    msg = _error(saved)
    assert str(weights) in msg and "missing" in msg and "transformer.h.1.mlp.c_fc.weight" in msg

    model, tokenizer = char_model()
    ckpt = write_nanogpt(tmp_path / "out", model, tokenizer)
    raw = torch.load(ckpt, weights_only=True)
    del raw["model"]["_orig_mod.transformer.ln_f.weight"]
    torch.save(raw, ckpt)
    msg = _error(ckpt)
    assert str(ckpt) in msg and "missing" in msg and "transformer.ln_f.weight" in msg


def test_wrong_shape(saved, tmp_path):
    weights = saved / "model.safetensors"
    state = load_file(weights)
    name = "transformer.h.0.attn.c_attn.weight"
    right = tuple(state[name].shape)
    state[name] = torch.zeros(right[0], right[1] + 1)
    save_file(state, weights)
    msg = _error(saved)
    assert str(weights) in msg and name in msg
    assert str(right) in msg and str((right[0], right[1] + 1)) in msg

    # a nanoGPT checkpoint whose model_args disagree with its tensors
    model, tokenizer = char_model()
    ckpt = write_nanogpt(tmp_path / "out", model, tokenizer)
    raw = torch.load(ckpt, weights_only=True)
    raw["model_args"]["block_size"] = 32
    torch.save(raw, ckpt)
    msg = _error(ckpt)
    assert str(ckpt) in msg and "transformer.wpe.weight" in msg
    assert str((32, model.config.n_embd)) in msg and str((64, model.config.n_embd)) in msg


def test_bad_json(saved):
    config = saved / "config.json"
    config.write_text(config.read_text()[:-20])
    msg = _error(saved)
    assert str(config) in msg and "JSON" in msg


def test_unknown_formats(tmp_path):
    junk = tmp_path / "weights.pt"
    junk.write_bytes(os.urandom(256).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    msg = _error(junk)
    assert str(junk) in msg and "unknown checkpoint format" in msg

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (llama / "model.safetensors").write_bytes(b"")
    msg = _error(llama)
    assert str(llama / "config.json") in msg and "unknown checkpoint format" in msg and "llama" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _error(empty)
    assert str(empty) in msg and "config.json" in msg

    msg = _error(tmp_path / "absent")
    assert str(tmp_path / "absent") in msg and "no such file" in msg


def test_pcgpt_config_problems(saved):
    config_path = saved / "config.json"
    config = json.loads(config_path.read_text())
    for change, expect in [({"model_type": "mamba"}, "mamba"),
                           ({"model_args": {**config["model_args"], "n_head": 5}}, "n_head"),
                           ({"tokenizer": {"type": "sentencepiece"}}, "tokenizer")]:
        config_path.write_text(json.dumps({**config, **change}))
        msg = _error(saved)
        assert str(config_path) in msg and expect in msg
    config_path.write_text(json.dumps(config))
    (saved / "model.safetensors").unlink()
    msg = _error(saved)
    assert str(saved / "model.safetensors") in msg and "missing" in msg


# ---------------------------------------------------------------------------------------------
# checkpoint info without the weights


def write_hf_gpt2(directory: Path, model) -> Path:
    """An HF GPT-2 directory (config.json + model.safetensors, Conv1D matrices stored [in, out])."""
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    (directory / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "n_positions": c.block_size, "vocab_size": c.vocab_size, "activation_function": "gelu_new"}))
    state = {k: (v.t() if k.endswith(HF_TRANSPOSED) else v).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, directory / "model.safetensors")
    return directory


def checkpoints_of_every_format(tmp_path) -> dict:
    model, tokenizer = char_model()
    torch.manual_seed(0)
    hf_model = GPT(preset_config("tiny", vocab_size=50257, bias=True, gelu_approximate="tanh")).eval()
    return {"pcgpt": save_pcgpt(tmp_path / "pcgpt", model, tokenizer, {"eval": {"val_loss": 1.7}}),
            "nanogpt": write_nanogpt(tmp_path / "nanogpt", model, tokenizer),
            "hf-gpt2": write_hf_gpt2(tmp_path / "hf", hf_model)}


def test_info_describes_what_loading_gives(tmp_path):
    for fmt, path in checkpoints_of_every_format(tmp_path).items():
        info = read_checkpoint_info(path)
        model, tokenizer, metadata = load_checkpoint(path)
        assert info.format == fmt and info.path == str(path)
        assert info.model_type == model.model_type == "gpt"
        assert info.config == model.config, fmt
        assert info.tokenizer.to_spec() == tokenizer.to_spec(), fmt
        assert info.metadata == metadata, fmt


def test_info_reads_no_weights(tmp_path, monkeypatch):
    """read_checkpoint_info takes tensor names and shapes from the safetensors header, or from a
    torch.load that maps the archive: with safetensors' reader of the data disabled, the info of a
    safetensors checkpoint still reads, while loading it does not."""
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were read")

    paths = checkpoints_of_every_format(tmp_path)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    for fmt, path in paths.items():
        assert read_checkpoint_info(path).format == fmt
    for fmt in ("pcgpt", "hf-gpt2"):
        with pytest.raises(AssertionError, match="the weights were read"):
            load_checkpoint(paths[fmt])


def test_reading_info_leaves_the_initialisers_working(saved):
    """The meta model behind the info is built with torch.nn.init's initialisers switched off;
    they are back afterwards, and a model built then is initialised."""
    initialisers = {n: getattr(torch.nn.init, n) for n in ("normal_", "zeros_", "uniform_", "kaiming_uniform_")}
    read_checkpoint_info(saved)
    assert {n: getattr(torch.nn.init, n) for n in initialisers} == initialisers
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=65))
    assert 0.01 < model.transformer.wte.weight.std() < 0.03  # GPT-2's init: N(0, 0.02)


# ---------------------------------------------------------------------------------------------
# every field of config.json checked at load (pcgpt/model/config_schema.py)


CONFIG_MISTAKES = [  # (change to config.json, the field the message must name)
    ({"model_args": {"n_head": 0}}, "model_args.n_head"),
    ({"model_args": {"n_head": 2.0}}, "model_args.n_head"),
    ({"model_args": {"n_layer": True}}, "model_args.n_layer"),
    ({"model_args": {"n_embd": 33}}, "model_args.n_embd"),  # not divisible by n_head
    ({"model_args": {"block_size": 0}}, "model_args.block_size"),
    ({"model_args": {"vocab_size": "65"}}, "model_args.vocab_size"),
    ({"model_args": {"dropout": 1.0}}, "model_args.dropout"),
    ({"model_args": {"dropout": float("nan")}}, "model_args.dropout"),
    ({"model_args": {"bias": "no"}}, "model_args.bias"),
    ({"model_args": {"gelu_approximate": "fast"}}, "model_args.gelu_approximate"),
    ({"model_args": []}, "model_args"),
    ({"format_version": 99}, "format_version"),
    ({"saved_at": "yesterday"}, "saved_at"),
    ({"created": "yesterday"}, "created"),
    ({"sampler": {"tau": "abc"}}, "sampler.tau"),
    ({"sampler": {"tau": -1}}, "sampler.tau"),
    ({"sampler": {"lam": None}}, "sampler.lam"),
    ({"sampler": {"tua": 2.0}}, "sampler.tua"),
    ({"sampler": [2.0]}, "sampler"),
    ({"eval": {"val_loss": "low"}}, "eval.val_loss"),
    ({"eval": "good"}, "eval"),
    ({"training": 3}, "training"),
]
PC_MISTAKES = [
    ({"model_args": {"alpha": 0}}, "model_args.alpha"),
    ({"model_args": {"max_settle_steps": -1}}, "model_args.max_settle_steps"),
    ({"model_args": {"default_settle_steps": 20, "max_settle_steps": 16}}, "model_args.default_settle_steps"),
    ({"model_args": {"generator_rank": "4"}}, "model_args.generator_rank"),
    ({"model_args": {"rho_max": float("inf")}}, "model_args.rho_max"),
    ({"model_args": {"early_stop": 1.5}}, "model_args.early_stop"),
]


def _with(config: dict, change: dict) -> dict:
    out = dict(config)
    for key, value in change.items():
        out[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    return out


def test_every_config_field_is_checked_with_one_message_naming_it(tmp_path):
    from pcgpt.model.pc import PCGPT
    model, tokenizer = char_model()
    torch.manual_seed(0)
    checkpoints = {"gpt": save_pcgpt(tmp_path / "gpt", model, tokenizer, {"eval": {"val_loss": 1.7}}),
                   "pc": save_pcgpt(tmp_path / "pc", PCGPT.from_baseline(model), tokenizer)}
    for kind, mistakes in (("gpt", CONFIG_MISTAKES), ("pc", CONFIG_MISTAKES[:3] + PC_MISTAKES)):
        config_path = checkpoints[kind] / "config.json"
        config = json.loads(config_path.read_text())
        for change, field in mistakes:
            config_path.write_text(json.dumps(_with(config, change)))
            msg = _error(checkpoints[kind])
            assert msg.startswith(f"{config_path}: {field}: "), (kind, change, msg)
            assert "\n" not in msg and "{" not in msg, msg  # one line, the field and its value, not the dict
        config_path.write_text(json.dumps(config))
        read_checkpoint_info(checkpoints[kind])  # the unchanged config still loads


def test_nanogpt_and_hf_model_args_are_checked(tmp_path):
    ckpt = tmp_path / "ckpt.pt"  # the arguments fail before any weight is looked at
    torch.save({"model": {}, "model_args": dict(n_layer=2, n_head=0, n_embd=32, block_size=64, bias=False,
                                                vocab_size=65, dropout=0.0)}, ckpt)
    assert _error(ckpt).startswith(f"{ckpt}: model_args.n_head: must be in [1, ")
    hf = tmp_path / "hf"  # the config fails before any weight is read
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32,
                                                "n_positions": "64", "vocab_size": 50257}))
    assert _error(hf).startswith(f"{hf / 'config.json'}: n_positions: must be an integer")


def test_nanogpt_dataset_cannot_steer_the_meta_lookup_outside_its_directory(tmp_path):
    ckpt = tmp_path / "ckpts" / "out" / "ckpt.pt"  # the tokenizer is looked up before the weights are checked
    ckpt.parent.mkdir(parents=True)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=65, dropout=0.0)
    write_meta(tmp_path / "elsewhere" / "meta.pkl", TEXT)  # out/data/../../../elsewhere/meta.pkl
    for dataset in ("../../../elsewhere", str(tmp_path / "elsewhere"), "..", 7):
        torch.save({"model": {}, "model_args": model_args, "config": {"dataset": dataset}}, ckpt)
        msg = _error(ckpt)
        assert msg.startswith(f"{ckpt}: config.dataset must be a directory name under data/"), (dataset, msg)


def test_cli_and_serve_refuse_a_bad_config_in_one_line(saved, capsys):
    """In process (the `pcgpt` entry point's main): serve fails on the config before it starts anything."""
    from pcgpt.cli import main
    config_path = saved / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "sampler": {"tau": "abc"}}))
    for args in (["inspect", str(saved)], ["serve", "--model", f"m={saved}", "--port", "9"]):
        capsys.readouterr()
        assert main(args) == 2, args
        out = capsys.readouterr()
        assert out.err == f"pcgpt {args[0]}: error: {config_path}: sampler.tau: must be a finite number, found 'abc'\n"
        assert out.out == ""
