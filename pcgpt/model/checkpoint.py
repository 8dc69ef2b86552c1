"""Checkpoint IO: load a model, its tokenizer and metadata from any supported format.

Formats are told apart by content, never by file name alone (DESIGN.md §2):
  - pcgpt directory: config.json with "format": "pcgpt" + model.safetensors (no pickle at all)
  - nanoGPT ckpt.pt: a torch.save'd dict with "model" and "model_args"; char vocabulary from a
    meta.pkl beside it (or given), GPT-2 BPE otherwise
  - HuggingFace GPT-2 directory: config.json with model_type "gpt2" + model.safetensors or
    pytorch_model.bin

Every failure is a CheckpointError whose message names the file and what is wrong.
"""

import json
import os
import pickle
import time
import zipfile
from pathlib import Path

import torch

from pcgpt.model.gpt import GPT, GPTConfig
from pcgpt.model.formats import to_inference_format
from pcgpt.model.tokenizer import TokenizerError, gpt2_tokenizer, load_meta_pkl, tokenizer_from_spec

FORMAT_MARKER = "pcgpt"
FORMAT_VERSION = 1
# HF GPT-2 stores these four as Conv1D (in, out) matrices; nanoGPT's Linear wants (out, in)
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def model_classes() -> dict:
    """model_type -> (config class, model class). The PC model registers here when present."""
    classes = {"gpt": (GPTConfig, GPT)}
    try:
        from pcgpt.model.pc import PCConfig, PCGPT
        classes["pc"] = (PCConfig, PCGPT)
    except ImportError:
        pass
    return classes


def detect_format(path: str | os.PathLike) -> str:
    """'pcgpt', 'hf-gpt2' or 'nanogpt', from what the path holds."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: a directory without config.json is not a checkpoint this server reads")
        config = _read_json(config_path)
        if config.get("format") == FORMAT_MARKER:
            return "pcgpt"
        if config.get("model_type") == "gpt2":
            return "hf-gpt2"
        raise CheckpointError(
            f"{config_path}: unknown checkpoint format (neither \"format\": \"pcgpt\" nor HF \"model_type\": \"gpt2\"; "
            f"model_type is {config.get('model_type')!r})")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; older torch wrote a bare pickle (protocol 2: 0x80 0x02)
    if magic == b"PK\x03\x04" or magic[:1] == b"\x80":
        return "nanogpt"
    raise CheckpointError(f"{path}: unknown checkpoint format (not a directory, torch.save archive or pickle)")


def load_checkpoint(path, meta_path=None, device="cpu", dtype=None):
    """Returns (model, tokenizer, metadata); the model is in eval mode on `device`."""
    fmt = detect_format(path)
    loader = {"pcgpt": _load_pcgpt, "nanogpt": _load_nanogpt, "hf-gpt2": _load_hf_gpt2}[fmt]
    model, tokenizer, metadata = loader(Path(path), meta_path)
    metadata = {"format": fmt, "path": str(path), **metadata}
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}")
    model.to(device=device, dtype=dtype or torch.float32).eval()
    return model, tokenizer, metadata


def load_for_inference(path, meta_path=None, device="cpu", dtype=None):
    """load_checkpoint as serving, generation, evaluation and the benchmarks use it: no parameter
    gradients (PC settling takes gradients w.r.t. its states only) and, on CPU, the [in, out]
    weight format (pcgpt.model.formats: module swaps over the same Parameters)."""
    model, tokenizer, metadata = load_checkpoint(path, meta_path=meta_path, device=device, dtype=dtype)
    model.requires_grad_(False)
    to_inference_format(model)
    return model, tokenizer, metadata


def save_pcgpt(directory, model, tokenizer, metadata: dict | None = None) -> Path:
    """Writes a pcgpt directory: config.json (format, model type and args, tokenizer, metadata)
    and model.safetensors. The tied lm_head is stored once, as transformer.wte.weight."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    config = {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "model_type": model.model_type,
        "model_args": model.config.to_dict(),
        "tokenizer": tokenizer.to_spec(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(metadata or {}),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _build(path: Path, model_type: str, model_args: dict):
    classes = model_classes()
    if model_type not in classes:
        raise CheckpointError(f"{path}: unknown model_type {model_type!r}; this server knows {sorted(classes)}")
    config_cls, model_cls = classes[model_type]
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{path}: model_args must be an object, found {type(model_args).__name__}")
    try:
        config = config_cls.from_dict(model_args)
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        return model_cls(config)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"{path}: invalid model arguments {model_args} ({e})") from None


def _load_state(path: Path, model, state: dict) -> None:
    """Copies `state` into the model, naming every missing, unexpected or misshapen tensor."""
    expected = model.state_dict()
    tied = "lm_head.weight"
    missing = [k for k in expected if k not in state and k != tied]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if k in expected and not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    if tied not in state:
        state = {**state, tied: state["transformer.wte.weight"]}
    if not torch.equal(state[tied], state["transformer.wte.weight"]):
        raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight, but this model ties them")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _torch_load(path: Path):
    """torch.load that never runs code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a long advice text; the line that names the offending global is the useful one
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[-1] if lines else "")
        detail = detail.removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()
        raise CheckpointError(f"{path}: refused: the pickle holds objects other than tensors and plain data, "
                              f"and loading it could run code ({detail[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


def _load_pcgpt(path: Path, meta_path):
    config = _read_json(path / "config.json")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a pcgpt directory holds config.json and model.safetensors)")
    for key in ("model_type", "model_args", "tokenizer"):
        if key not in config:
            raise CheckpointError(f"{path / 'config.json'}: missing key {key!r}")
    try:
        tokenizer = tokenizer_from_spec(config["tokenizer"])
    except TokenizerError as e:
        raise CheckpointError(f"{path / 'config.json'}: bad tokenizer spec ({e})") from None
    model = _build(path / "config.json", config["model_type"], config["model_args"])
    _load_state(weights, model, _read_safetensors(weights))
    metadata = {k: v for k, v in config.items() if k not in ("model_args", "tokenizer")}
    return model, tokenizer, metadata


def _load_nanogpt(path: Path, meta_path):
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (expected a dict with 'model' and 'model_args', found {keys})")
    model = _build(path, "gpt", ckpt["model_args"])
    # torch.compile'd models save their parameters under _orig_mod.
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}  # nanoGPT's causal-mask buffer
    _load_state(path, model, state)
    tokenizer = _nanogpt_tokenizer(path, meta_path, ckpt.get("config") or {})
    train_config = ckpt.get("config") or {}
    metadata = {"model_type": "gpt",
                "training": {"iter_num": _plain(ckpt.get("iter_num")),
                             "best_val_loss": _plain(ckpt.get("best_val_loss")),
                             "dataset": train_config.get("dataset") if isinstance(train_config, dict) else None}}
    return model, tokenizer, metadata


def _nanogpt_tokenizer(path: Path, meta_path, train_config: dict):
    """nanoGPT's sample.py looks for data/<dataset>/meta.pkl; we look beside the checkpoint too."""
    candidates = [Path(meta_path)] if meta_path else [path.parent / "meta.pkl"]
    if not meta_path and isinstance(train_config, dict) and train_config.get("dataset"):
        candidates.append(path.parent / "data" / str(train_config["dataset"]) / "meta.pkl")
    for candidate in candidates:
        if candidate.is_file():
            try:
                return load_meta_pkl(candidate)
            except TokenizerError as e:
                raise CheckpointError(str(e)) from None
    if meta_path:
        raise CheckpointError(f"{meta_path}: no such meta.pkl")
    return gpt2_tokenizer()


def _load_hf_gpt2(path: Path, meta_path):
    config = _read_json(path / "config.json")
    try:
        model_args = dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                          block_size=config["n_positions"], vocab_size=config["vocab_size"], bias=True,
                          gelu_approximate="tanh" if config.get("activation_function", "gelu_new") == "gelu_new" else "none")
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'}: missing key {e.args[0]!r} for a GPT-2 config") from None
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu"):
        raise CheckpointError(f"{path / 'config.json'}: activation {config['activation_function']!r} is not supported")
    if (eps := config.get("layer_norm_epsilon", 1e-5)) != 1e-5:
        raise CheckpointError(f"{path / 'config.json'}: layer_norm_epsilon {eps} is not supported (only 1e-5)")
    if safetensors_path := next((p for p in [path / "model.safetensors"] if p.is_file()), None):
        state = _read_safetensors(safetensors_path)
        weights = safetensors_path
    elif (weights := path / "pytorch_model.bin").is_file():
        state = _torch_load(weights)
    else:
        raise CheckpointError(f"{path}: HF GPT-2 directory without model.safetensors or pytorch_model.bin")
    model = _build(weights, "gpt", model_args)
    converted = {}
    for k, v in state.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # HF's causal-mask buffers, not weights
        name = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k  # GPT2Model drops the prefix
        converted[name] = v.t() if name.endswith(HF_TRANSPOSED) and v.ndim == 2 else v
    _load_state(weights, model, converted)
    return model, gpt2_tokenizer(), {"model_type": "gpt"}


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    return value
