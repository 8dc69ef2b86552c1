"""Training for both model types, after nanoGPT's train.py.

AdamW with weight decay on matrices only, linear warmup then cosine decay, gradient
accumulation, clipping, dropout, mixed precision on GPU, periodic evaluation, best-checkpoint
saving and resume. The loss comes from the model: `model.loss(idx, targets, **options)`
returns (loss, info); the PC model's adds the unrolled-settling and free-energy terms.
"""

import json
import math
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pcgpt.model.checkpoint import load_checkpoint, save_pcgpt
from pcgpt.model.gpt import GPT, preset_config
from pcgpt.model.tokenizer import CharTokenizer, gpt2_tokenizer


@dataclass
class TrainConfig:
    data: str  # a UTF-8 text file; the first 90% trains, the last 10% validates (nanoGPT's split)
    out_dir: str  # where the pcgpt checkpoint directory (best by validation loss) is written
    model_type: str = "gpt"  # "gpt" (baseline) or "pc" (predictive coding)
    init_from: str | None = None  # a checkpoint to start from (e.g. a baseline for PC); None = scratch
    resume: bool = False  # continue from out_dir/train_state.pt (optimizer, step, RNG)
    preset: str = "char-small"  # model shape when training from scratch (model/gpt.py PRESETS)
    tokenizer: str = "char"  # "char" (vocabulary from the training text) or "gpt2"
    dropout: float = 0.0  # dropout in the model while training
    max_iters: int = 2000  # optimizer steps
    max_seconds: float = 0.0  # also stop (after a final evaluation) once training has run this long; 0 = off
    batch_size: int = 16  # sequences per micro-batch
    block_size: int = 256  # sequence length while training
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int | None = None  # steps of cosine decay (default: max_iters)
    weight_decay: float = 0.1  # AdamW decay, on matrices only (not biases, LayerNorm or precisions)
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)
    eval_interval: int = 250  # steps between evaluations (and best-checkpoint saves)
    eval_iters: int = 20  # validation batches per evaluation
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype on GPU; CPU trains in fp32
    threads: int = 0  # torch threads on CPU (0 = PyTorch's default)
    # predictive coding (model_type "pc")
    pc_train: str = "all"  # "all" parameters, or "generators" (g_l and precisions only, baseline frozen)
    pc_learning: str = "backprop"  # "backprop" through unrolled settling, or "local" (each part from its own error)
    pc_k_max: int = 2  # unrolled settling steps are sampled from {0..k_max} per batch
    pc_lambda0: float = 0.5  # weight of the unsettled prediction's CE (keeps T = 0 good)
    pc_lambda_energy: float = 0.01  # weight of the free energy at the detached settled states
    pc_alpha: float = 0.25  # settling step size while training
    pc_default_settle_steps: int = 1  # stored in the checkpoint as the serving default
    pc_serve_alpha: float = 0.1  # settling step size stored in the checkpoint (serving, evaluation)
    pc_rho_lr_scale: float = 0.1  # the precisions' learning rate relative to the rest: learned at full speed κ runs away
    pc_error_law: str = "gaussian"  # law of the prediction errors: "gaussian", "laplace" or "student_t" (learned ν per layer)
    pc_ln_precision: bool = False  # measure errors in LayerNorm units (1/σ of each state as its precision)
    pc_attention_precision: bool = False  # weight attention's heads by learned per-head precisions
    command: str = field(default="", repr=False)  # the command line that started this run, recorded in the checkpoint


# the values a str field accepts (the CLI's choices)
TRAIN_CHOICES = {"model_type": ("gpt", "pc"), "tokenizer": ("char", "gpt2"), "pc_train": ("all", "generators"),
                 "pc_learning": ("backprop", "local"), "pc_error_law": ("gaussian", "laplace", "student_t")}


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


def load_text_splits(path: str, tokenizer):
    text = Path(path).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator, device):
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x.to(device), y.to(device)


def lr_at(it: int, cfg: TrainConfig) -> float:
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(params, cfg: TrainConfig, device, slow_params=()):
    """AdamW; weight decay only on parameters with 2+ dimensions (matrices and embeddings).
    `slow_params` (the PC precisions) learn at pc_rho_lr_scale times the rate, without decay."""
    slow = {id(p) for p in slow_params}
    params = [p for p in params if p.requires_grad and id(p) not in slow]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if slow:
        groups.append({"params": list(slow_params), "weight_decay": 0.0, "lr_scale": cfg.pc_rho_lr_scale})
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def build_model(cfg: TrainConfig, tokenizer, device):
    """A fresh model, or one started from a checkpoint (a baseline becomes a PC model's f)."""
    if cfg.init_from:
        base, base_tok, _ = load_checkpoint(cfg.init_from, device="cpu")
        tokenizer = base_tok
        if cfg.model_type == "pc" and base.model_type == "gpt":
            from pcgpt.model.pc import PCGPT
            model = PCGPT.from_baseline(base, **pc_options(cfg))
        else:
            model = base
    else:
        gpt_config = preset_config(cfg.preset, vocab_size=tokenizer.vocab_size, block_size=cfg.block_size)
        if cfg.model_type == "pc":
            from pcgpt.model.pc import PCConfig, PCGPT
            model = PCGPT(PCConfig(**gpt_config.to_dict(), **pc_options(cfg)))
        else:
            model = GPT(gpt_config)
    model.set_dropout(cfg.dropout) if hasattr(model, "set_dropout") else None
    return model.to(device), tokenizer


def pc_options(cfg: TrainConfig) -> dict:
    """The PCConfig fields a training run sets."""
    return dict(default_settle_steps=cfg.pc_default_settle_steps, alpha=cfg.pc_serve_alpha, error_law=cfg.pc_error_law,
                ln_precision=bool(cfg.pc_ln_precision), attention_precision=bool(cfg.pc_attention_precision))


def trainable_parameters(model, cfg: TrainConfig):
    if cfg.model_type == "pc" and cfg.pc_train == "generators":
        return list(model.generator_parameters())
    return list(model.parameters())


@torch.no_grad()
def estimate_loss(model, splits, cfg: TrainConfig, generator, device, autocast) -> dict:
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, generator, device)
            with autocast:
                losses[k] = model.eval_loss(x, y)
        out[name] = losses.mean().item()
    model.train()
    return out


def train(cfg: TrainConfig) -> dict:
    from pcgpt.model.device import resolve_device, resolve_dtype
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = gpt2_tokenizer() if cfg.tokenizer == "gpt2" else CharTokenizer.from_text(Path(cfg.data).read_text(encoding="utf-8"))
    model, tokenizer = build_model(cfg, tokenizer, device)
    train_data, val_data = load_text_splits(cfg.data, tokenizer)
    splits = {"train": train_data, "val": val_data}

    params = trainable_parameters(model, cfg)
    if cfg.model_type == "pc" and cfg.pc_train == "generators":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    optimizer = make_optimizer(params, cfg, device, slow_params=list(model.slow_parameters()) if cfg.model_type == "pc" else [])
    amp_dtype = resolve_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if device.type == "cuda" and amp_dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and amp_dtype == torch.float16)

    batch_gen = torch.Generator().manual_seed(cfg.seed)
    eval_gen_seed = cfg.seed + 1
    state_path = out_dir / "train_state.pt"
    it, best_val, elapsed = 0, float("inf"), 0.0
    history = []
    if cfg.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batch_gen.set_state(state["batch_rng"])
        it, best_val, elapsed, history = state["iter"], state["best_val"], state["elapsed"], json.loads(state["history"])
        if "torch_rng" in state:  # the PC loss samples its unrolled steps K from the global generator
            torch.set_rng_state(state["torch_rng"])

    loss_options = model.loss_options(cfg) if hasattr(model, "loss_options") else {}
    model.train()
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum
    bar = tqdm(total=cfg.max_iters, initial=it, desc=f"train {cfg.model_type}", unit="it", file=sys.stderr,
               dynamic_ncols=True)
    t_last = time.perf_counter()
    result = {}
    resumed_at = None
    if history and history[-1]["iter"] == it:  # resumed at an evaluation that is already recorded
        resumed_at = it
        result = {"iter": it, "best_val": best_val, **{k: v for k, v in history[-1].items() if k != "iter"}}
    while True:
        final = it >= cfg.max_iters or 0 < cfg.max_seconds <= elapsed
        if (it % cfg.eval_interval == 0 or final) and it != resumed_at:
            losses = estimate_loss(model, splits, cfg, torch.Generator().manual_seed(eval_gen_seed), device, autocast)
            history.append({"iter": it, **losses})
            bar.write(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f}")
            if losses["val"] < best_val or final and best_val == float("inf"):
                best_val = losses["val"]
                save_pcgpt(out_dir, model, tokenizer, _metadata(cfg, it, elapsed, best_val, losses, history))
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "batch_rng": batch_gen.get_state(), "torch_rng": torch.get_rng_state(), "iter": it, "best_val": best_val,
                        "elapsed": elapsed, "history": json.dumps(history)}, state_path)
            result = {"iter": it, "best_val": best_val, **losses}
        if final:
            break
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        info = {}
        for _ in range(cfg.grad_accum):
            x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, batch_gen, device)
            with autocast:
                loss, info = model.loss(x, y, **loss_options)
            scaler.scale(loss / cfg.grad_accum).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "after_step"):
            model.after_step()
        now = time.perf_counter()
        elapsed += now - t_last
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens_per_iter / (now - t_last):,.0f}", lr=f"{lr:.1e}",
                        **{k: f"{v:.3g}" for k, v in info.items()})
        t_last = now
        bar.update(1)
        it += 1
    bar.close()
    return result


def _metadata(cfg: TrainConfig, it, elapsed, best_val, losses, history) -> dict:
    return {
        "training": {
            "command": cfg.command,
            "config": {k: v for k, v in asdict(cfg).items() if k != "command"},
            "iterations": it,
            "seconds": round(elapsed, 1),
            "torch": torch.__version__,
            "history": history,
        },
        "eval": {"split": "val (last 10%)", "val_loss": best_val, "train_loss": losses["train"]},
    }


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["pcgpt", *sys.argv[1:]])
