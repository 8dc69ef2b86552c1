"""Training for both model types, after nanoGPT's train.py.

AdamW with weight decay on matrices only, linear warmup then cosine decay, gradient
accumulation, clipping, dropout, mixed precision on GPU, periodic evaluation, best-checkpoint
saving and resume. The loss comes from the model: `model.loss(idx, targets, **options)`
returns (loss, info); the PC model's adds the unrolled-settling and free-energy terms.
"""

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pcgpt.model.checkpoint import load_checkpoint, save_pcgpt
from pcgpt.model.gpt import GPT, preset_config
from pcgpt.model.tokenizer import CharTokenizer, TokenizerError, gpt2_tokenizer
# the settings live in a torch-free module (the CLI parses them without torch); re-exported here
from pcgpt.model.train_config import (GPT2_TRAIN_DEFAULTS, PRESET_TRAIN_DEFAULTS, TrainConfig,  # noqa: F401
                                      check_train_config, command_line, train_config)


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


def check_model_and_data(cfg: TrainConfig, model, splits) -> None:
    """What check_train_config cannot know before the model and the data are loaded."""
    if cfg.init_from and model.model_type != cfg.model_type:
        raise ValueError(f"--model-type {cfg.model_type}: --init-from {cfg.init_from} is a {model.model_type} "
                         f"checkpoint, which trains as {model.model_type} (a gpt one can become pc, not back)")
    if cfg.block_size > model.config.block_size:
        raise ValueError(f"--block-size {cfg.block_size}: over the context length {model.config.block_size} "
                         f"of --init-from {cfg.init_from}")
    for name, data in splits.items():
        if len(data) < cfg.block_size + 2:
            raise ValueError(f"--data {cfg.data}: its {name} split is {len(data)} tokens, too short for "
                             f"--block-size {cfg.block_size}")


@torch.no_grad()
def estimate_loss(model, splits, cfg: TrainConfig, generator, device, autocast, progress=None) -> dict:
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, generator, device)
            with autocast:
                losses[k] = model.eval_loss(x, y)
            if progress is not None:
                progress.update(1)
        out[name] = losses.mean().item()
    model.train()
    return out


def evaluation_iters(start: int, cfg: TrainConfig, skip=None) -> list[int]:
    """The iterations at which train() evaluates: every eval_interval, and at the end."""
    its = [i for i in range(start, cfg.max_iters + 1) if i % cfg.eval_interval == 0 or i == cfg.max_iters]
    return [i for i in its if i != skip]


def describe_cost(cfg: TrainConfig, start: int, n_evals: int) -> str:
    """The work a run will do, said before it starts."""
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum
    eval_tokens = n_evals * 2 * cfg.eval_iters * cfg.batch_size * cfg.block_size
    return (f"train: {cfg.max_iters - start:,} steps x {tokens_per_iter:,} tokens = "
            f"{(cfg.max_iters - start) * tokens_per_iter:,} tokens; {n_evals} evaluations x 2 splits x "
            f"{cfg.eval_iters} batches = {eval_tokens:,} tokens (forward only)")


def train(cfg: TrainConfig) -> dict:
    from pcgpt.model.device import resolve_device, resolve_dtype
    check_train_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = gpt2_tokenizer() if cfg.tokenizer == "gpt2" else CharTokenizer.from_text(Path(cfg.data).read_text(encoding="utf-8"))
    model, tokenizer = build_model(cfg, tokenizer, device)
    try:
        train_data, val_data = load_text_splits(cfg.data, tokenizer)
    except TokenizerError as e:  # e.g. text outside the vocabulary of --init-from's checkpoint
        raise ValueError(f"--data {cfg.data}: {e}") from None
    splits = {"train": train_data, "val": val_data}
    check_model_and_data(cfg, model, splits)

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
    result = {}
    resumed_at = None
    if history and history[-1]["iter"] == it:  # resumed at an evaluation that is already recorded
        resumed_at = it
        result = {"iter": it, "best_val": best_val, **{k: v for k, v in history[-1].items() if k != "iter"}}
    eval_its = evaluation_iters(it, cfg, skip=resumed_at)
    print(describe_cost(cfg, it, len(eval_its)), file=sys.stderr, flush=True)
    bar = tqdm(total=cfg.max_iters, initial=it, desc=f"train {cfg.model_type}", unit="it", file=sys.stderr,
               dynamic_ncols=True)
    start_it, eval_seconds, estimate_said = it, [], False
    t_last = time.perf_counter()
    while True:
        final = it >= cfg.max_iters or 0 < cfg.max_seconds <= elapsed
        if it in eval_its or final and it != resumed_at:  # --max-seconds ends with an evaluation too
            t_eval = time.perf_counter()
            # evaluations can take as long as many steps: their own bar, so progress shows from the start
            with tqdm(total=2 * cfg.eval_iters, desc=f"evaluate at step {it}", unit="batch", file=sys.stderr,
                      dynamic_ncols=True, leave=False) as eval_bar:
                losses = estimate_loss(model, splits, cfg, torch.Generator().manual_seed(eval_gen_seed), device,
                                       autocast, progress=eval_bar)
            eval_seconds.append(time.perf_counter() - t_eval)
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
        t_step = time.perf_counter()
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
        if not estimate_said:  # one step and one evaluation measured: the whole run's time, said once
            estimate_said = True
            step_s, eval_s = now - t_step, (eval_seconds[0] if eval_seconds else 0.0)
            total = step_s * (cfg.max_iters - start_it) + eval_s * len(eval_its)
            bar.write(f"estimated time: {_duration(total)} ({step_s:.2f} s a step, {eval_s:.1f} s an evaluation)",
                      file=sys.stderr)
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens_per_iter / (now - t_step):,.0f}", lr=f"{lr:.1e}",
                        **{k: f"{v:.3g}" for k, v in info.items()})
        t_last = now
        bar.update(1)
        it += 1
    bar.close()
    return result


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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

