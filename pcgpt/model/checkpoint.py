"""Checkpoint IO: load a model, its tokenizer and metadata from any supported format.

Formats are told apart by content, never by file name alone:
  - pcgpt directory: config.json with "format": "pcgpt" + model.safetensors (no pickle at all)
  - nanoGPT ckpt.pt: a torch.save'd dict with "model" and "model_args"; char vocabulary from a
    meta.pkl beside it (or given), GPT-2 BPE otherwise
  - HuggingFace GPT-2 directory: config.json with model_type "gpt2" + model.safetensors or
    pytorch_model.bin

Two ways in:
  - read_checkpoint_info: what a checkpoint is (format, model type, config, tokenizer, metadata),
    without reading a weight. The weight file's tensor names and shapes are checked against the
    model the config builds, from the safetensors header or a torch.load that maps the file
    instead of reading it. The HTTP server reads this; each engine process loads the weights.
  - load_checkpoint: the same, then the model built and its weights loaded.

Every failure is a CheckpointError whose message names the file and what is wrong.
"""

import contextlib
import json
import os
import pickle
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pcgpt.model.config_schema import ConfigFieldError, check_model_args, check_pcgpt_config
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


@dataclass
class CheckpointInfo:
    """A checkpoint described without its weights: enough to tokenize for it, check requests
    against it and describe it (pcgpt.model.card)."""

    path: str
    format: str  # 'pcgpt', 'nanogpt' or 'hf-gpt2'
    model_type: str  # 'gpt' or 'pc'
    config: GPTConfig  # a PCConfig for a PC model
    tokenizer: object  # CharTokenizer or GPT2Tokenizer
    metadata: dict  # format, path, and the checkpoint's own entries (training, eval, sampler, ...)

    @classmethod
    def of(cls, model, tokenizer, metadata: dict) -> "CheckpointInfo":
        """The info of a model already loaded (load_checkpoint's three results)."""
        return cls(path=str(metadata.get("path", "")), format=str(metadata.get("format", "")),
                   model_type=model.model_type, config=model.config, tokenizer=tokenizer, metadata=metadata)


def read_checkpoint_info(path, meta_path=None) -> CheckpointInfo:
    """The checkpoint's format, model type, config, tokenizer and metadata, and its weight file's
    tensor names and shapes checked, without reading a weight (see the module docstring)."""
    info, weights, index = _read(Path(path), meta_path, _read_weight_index)
    meta_model = build_model(info.model_type, info.config, device="meta")
    quantization = checkpoint_quantization(info.metadata, info.path)
    if quantization is not None:
        from pcgpt.model.quantize import expected_quantized_state
        _check_state(weights, expected_quantized_state(meta_model, quantization), index)
    else:
        _check_state(weights, meta_model.state_dict(), index)
    return info


def load_checkpoint(path, meta_path=None, device="cpu", dtype=None):
    """Returns (model, tokenizer, metadata); the model is in eval mode on `device`."""
    info, weights, state = _read(Path(path), meta_path, _read_weights)
    model = build_model(info.model_type, info.config)
    quantization = checkpoint_quantization(info.metadata, info.path)
    if quantization is not None:
        _load_quantized(weights, model, state, quantization, device, dtype or torch.float32)
        return model.eval(), info.tokenizer, info.metadata
    _load_state(weights, model, state)
    model.to(device=device, dtype=dtype or torch.float32).eval()
    return model, info.tokenizer, info.metadata


def build_model(model_type: str, config, device=None):
    """The model class for model_type, built from config. On the meta device (shapes, no memory,
    for describing and checking a checkpoint) its initialisers are skipped: the first initialiser
    run on a meta tensor imports PyTorch's Python meta kernels (sympy and ~800 modules, about a
    second and 60 MB) to produce values a meta tensor does not hold anyway."""
    _, model_cls = model_classes()[model_type]
    if device is None:
        return model_cls(config)
    with torch.device(device), (_initialisers_skipped() if torch.device(device).type == "meta" else contextlib.nullcontext()):
        return model_cls(config)


@contextlib.contextmanager
def _initialisers_skipped():
    """torch.nn.init's in-place initialisers as no-ops, for the duration (process-wide: used while
    building a meta model only)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_for_inference(path, meta_path=None, device="cpu", dtype=None, quantization=None):
    """load_checkpoint as serving, generation, evaluation and the benchmarks use it: no parameter
    gradients (PC settling takes gradients w.r.t. its states only), `quantization` (a
    pcgpt.model.quantize.Quantization, or None) applied and, on CPU, the [in, out] weight format
    for what stays float (pcgpt.model.formats: module swaps over the same Parameters)."""
    model, tokenizer, metadata = load_checkpoint(path, meta_path=meta_path, device=device, dtype=dtype)
    model.requires_grad_(False)
    if quantization is not None:
        stored = getattr(model, "quantization", None)
        if stored is None:
            from pcgpt.model.quantize import quantize
            quantize(model, quantization)
        elif stored != quantization:
            raise CheckpointError(f"{path}: holds {stored.name} weights; --quantize {quantization.name} would "
                                  f"quantize them again (leave --quantize out, or start from the float checkpoint)")
    to_inference_format(model)
    return model, tokenizer, metadata


def _ordinary_file_mode(path: Path) -> None:
    """safetensors writes its file 0600; a checkpoint is for others to read (another user, a
    container's non-root user), so it gets the mode open() gives: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pcgpt(directory, model, tokenizer, metadata: dict | None = None) -> Path:
    """Writes a pcgpt directory: config.json (format, model type and args, tokenizer, metadata)
    and model.safetensors. The tied lm_head is stored once, as transformer.wte.weight."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return _write_pcgpt(directory, state, model, tokenizer, metadata or {})


def _write_pcgpt(directory, state: dict, model, tokenizer, metadata: dict) -> Path:
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    _ordinary_file_mode(directory / "model.safetensors")
    config = {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "model_type": model.model_type,
        "model_args": model.config.to_dict(),
        "tokenizer": tokenizer.to_spec(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **metadata,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def checkpoint_quantization(metadata: dict, path=""):
    """The Quantization a pcgpt checkpoint's config.json names ("quantization"), or None."""
    spec = metadata.get("quantization")
    if spec is None:
        return None
    from pcgpt.model.quantize import Quantization
    try:
        return Quantization(spec["scheme"], spec.get("group_size", 32))
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: bad \"quantization\" entry {spec!r} ({e})") from None


def save_quantized(directory, model, tokenizer, metadata: dict | None = None) -> Path:
    """save_pcgpt for a quantized model (pcgpt.model.quantize): model.safetensors holds the float
    tensors and each quantized weight's parts (`<name>.weight.qdata`, `.scale`, `.zero`), and
    config.json names the quantization, so loading packs the parts without quantizing again."""
    from pcgpt.model.quantize import quantized_state
    return _write_pcgpt(directory, quantized_state(model), model, tokenizer,
                        {**(metadata or {}), "quantization": model.quantization.to_dict()})


def _load_quantized(path: Path, model, state: dict, quantization, device, dtype) -> None:
    from pcgpt.model.quantize import expected_quantized_state, load_quantized_state
    _check_state(path, expected_quantized_state(model, quantization), state)
    model.to(device=device, dtype=dtype)
    try:
        load_quantized_state(model, state, quantization, device, dtype)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


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


def _read(path: Path, meta_path, read_weights):
    """(info, weight file, state) for any format; read_weights(file) gives the file's tensors: the
    data (_read_weights) or their names and shapes only (_read_weight_index)."""
    fmt = detect_format(path)
    reader = {"pcgpt": _read_pcgpt, "nanogpt": _read_nanogpt, "hf-gpt2": _read_hf_gpt2}[fmt]
    model_type, config, tokenizer, metadata, weights, state = reader(path, meta_path, read_weights)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{config.vocab_size}")
    metadata = {"format": fmt, "path": str(path), **metadata}
    return CheckpointInfo(str(path), fmt, model_type, config, tokenizer, metadata), weights, state


def _model_config(path: Path, model_type: str, model_args: dict, names: dict | None = None):
    """The validated config for model_type from model_args: every field's type and range
    (config_schema; `names`: what the file calls an argument), then a model built from it on the
    meta device, so arguments the model's constructor rejects fail here too."""
    classes = model_classes()
    if model_type not in classes:
        raise CheckpointError(f"{path}: unknown model_type {model_type!r}; this server knows {sorted(classes)}")
    config_cls, _ = classes[model_type]
    try:
        check_model_args(model_type, model_args, "" if names else "model_args.", names)
    except ConfigFieldError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        config = config_cls.from_dict(model_args)
        build_model(model_type, config, device="meta")
        return config
    except (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: invalid model arguments {model_args} ({e})") from None


def _check_state(path: Path, expected: dict, state: dict) -> None:
    """Names every missing, unexpected or misshapen tensor of `state` against the model's state_dict."""
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


def _load_state(path: Path, model, state: dict) -> None:
    """Copies `state` into the model, after _check_state."""
    _check_state(path, model.state_dict(), state)
    tied = "lm_head.weight"
    if tied not in state:
        state = {**state, tied: state["transformer.wte.weight"]}
    if not torch.equal(state[tied], state["transformer.wte.weight"]):
        raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight, but this model ties them")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _read_weights(path: Path) -> dict:
    """Every tensor of a weight file (model.safetensors, or a torch.save'd state dict)."""
    if not _is_safetensors(path):
        return _torch_load(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _read_weight_index(path: Path) -> dict:
    """A weight file's tensors as names and shapes, no data read: meta tensors from the
    safetensors header (which safetensors checks against the file's length), or a torch.load
    that maps the file (what it holds besides tensors is unpickled, under weights_only)."""
    if not _is_safetensors(path):
        return _torch_load(path)
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _torch_load(path: Path):
    """torch.load that never runs code from the file. A zip archive (what torch.save writes) is
    mapped, not read: its tensors are read when used."""
    try:
        with open(path, "rb") as f:
            mmap = f.read(4) == b"PK\x03\x04"
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is a long advice text; the line that names the offending global is the useful one
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[-1] if lines else "")
        detail = detail.removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()
        raise CheckpointError(f"{path}: refused: the pickle holds objects other than tensors and plain data, "
                              f"and loading it could run code ({detail[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


def _read_pcgpt(path: Path, meta_path, read_weights):
    config = _read_json(path / "config.json")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a pcgpt directory holds config.json and model.safetensors)")
    try:
        check_pcgpt_config(config, FORMAT_VERSION, model_classes())
    except ConfigFieldError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    try:
        tokenizer = tokenizer_from_spec(config["tokenizer"])
    except TokenizerError as e:
        raise CheckpointError(f"{path / 'config.json'}: bad tokenizer spec ({e})") from None
    model_config = _model_config(path / "config.json", config["model_type"], config["model_args"])
    metadata = {k: v for k, v in config.items() if k not in ("model_args", "tokenizer")}
    return config["model_type"], model_config, tokenizer, metadata, weights, read_weights(weights)


def _read_nanogpt(path: Path, meta_path, read_weights):
    ckpt = _torch_load(path)  # the config lives in the weight file: mapped, the tensors stay unread
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (expected a dict with 'model' and 'model_args', found {keys})")
    config = _model_config(path, "gpt", ckpt["model_args"])
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, not a state dict")
    # torch.compile'd models save their parameters under _orig_mod.
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}  # nanoGPT's causal-mask buffer
    train_config = ckpt.get("config") or {}
    tokenizer = _nanogpt_tokenizer(path, meta_path, train_config)
    metadata = {"model_type": "gpt",
                "training": {"iter_num": _plain(ckpt.get("iter_num")),
                             "best_val_loss": _plain(ckpt.get("best_val_loss")),
                             "dataset": train_config.get("dataset") if isinstance(train_config, dict) else None}}
    return "gpt", config, tokenizer, metadata, path, state


def _nanogpt_tokenizer(path: Path, meta_path, train_config: dict):
    """nanoGPT's sample.py looks for data/<dataset>/meta.pkl; we look beside the checkpoint too."""
    candidates = [Path(meta_path)] if meta_path else [path.parent / "meta.pkl"]
    if not meta_path and isinstance(train_config, dict) and train_config.get("dataset"):
        dataset = train_config["dataset"]
        # a directory name under data/, as nanoGPT's are: the checkpoint must not steer the
        # lookup (and the unpickling of a meta.pkl) outside its own directory
        if not (isinstance(dataset, str) and dataset not in (".", "..") and re.fullmatch(r"[\w.-]+", dataset)):
            raise CheckpointError(f"{path}: config.dataset must be a directory name under data/, found {dataset!r}")
        candidates.append(path.parent / "data" / dataset / "meta.pkl")
    for candidate in candidates:
        if candidate.is_file():
            try:
                return load_meta_pkl(candidate)
            except TokenizerError as e:
                raise CheckpointError(str(e)) from None
    if meta_path:
        raise CheckpointError(f"{meta_path}: no such meta.pkl")
    return gpt2_tokenizer()


def _read_hf_gpt2(path: Path, meta_path, read_weights):
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
    weights = next((p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: HF GPT-2 directory without model.safetensors or pytorch_model.bin")
    model_config = _model_config(path / "config.json", "gpt", model_args, names={"block_size": "n_positions"})
    converted = {}
    for k, v in read_weights(weights).items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # HF's causal-mask buffers, not weights
        name = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k  # GPT2Model drops the prefix
        converted[name] = v.t() if name.endswith(HF_TRANSPOSED) and getattr(v, "ndim", 0) == 2 else v
    return "gpt", model_config, gpt2_tokenizer(), {"model_type": "gpt"}, weights, converted


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    return value
