"""`pcgpt eval`: loss, perplexity, the effect of settling, speed and calibration on a text file.

The text is cut into non-overlapping windows of the model's context, so every token of the first
max_tokens of the split is predicted exactly once (as nanoGPT's estimate_loss would on random
windows, but deterministic and covering the split). For a PC model each settle-steps value T runs
over the same windows; the unsettled logits come out of the same pass, which gives the T = 0
reference (KL, top-1 flips, delta loss) of every T without a second forward.

Calibration asks whether a per-token uncertainty signal ranks tokens by how surprised the model
will be by the true next token: Spearman ρ of the signal against −log2 p(target) (docs/pc.md
discusses which signals do).
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

from pcgpt.model.sampling import token_stats
from pcgpt.model.tokenizer import TokenizerError

_LN2 = math.log(2.0)

# per-token uncertainty signals, all oriented so that larger means "less sure"
BASE_SIGNALS = ("entropy", "varentropy", "neg_max_prob")
PC_SIGNALS = ("energy0", "energy", "kl_settle")


# --- data ---------------------------------------------------------------------------------------

def split_ids(tokenizer, data_path: str, split: str) -> torch.Tensor:
    """Token ids of the split: "val" is nanoGPT's last 10% (the same cut training used), "all" the file."""
    from pcgpt.model.train import load_text_splits
    if split == "val":
        return load_text_splits(data_path, tokenizer)[1]
    if split == "all":
        with open(data_path, encoding="utf-8") as f:
            return torch.tensor(tokenizer.encode(f.read()), dtype=torch.long)
    raise ValueError(f"split must be 'val' or 'all', got {split!r}")


def make_windows(ids: torch.Tensor, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (x, y) windows with y = x shifted by one: every target appears exactly once.
    The last window may be shorter than block_size (the remainder), never dropped."""
    windows = []
    for i in range(0, len(ids) - 1, block_size):
        x = ids[i:i + block_size]
        y = ids[i + 1:i + 1 + block_size]
        x = x[:len(y)]
        windows.append((x, y))
    return windows


def make_batches(windows, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stacks windows of equal length into batches of at most batch_size (the short remainder
    window goes alone, so no padding is ever scored)."""
    batches = []
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(len(w[0]), []).append(w)
    for length in sorted(by_len, reverse=True):
        group = by_len[length]
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            batches.append((torch.stack([x for x, _ in chunk]), torch.stack([y for _, y in chunk])))
    return batches


# --- per-token measurements ---------------------------------------------------------------------

def _sync(device) -> None:
    # CUDA runs asynchronously: without a sync the timer measures the launch, not the work.
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_batch(model, x, settle_steps: int):
    """(settled logits, unsettled logits, info or None) for one batch; the baseline has no settling."""
    if getattr(model, "model_type", "gpt") == "pc":
        return model.settled_forward(x, settle_steps)
    logits = model(x)
    return logits, logits, None


def token_measures(model, logits, logits0, info, y) -> dict[str, torch.Tensor]:
    """Per-token measurements (flat, float64 on CPU) of one batch."""
    V = logits.shape[-1]
    logits, logits0 = logits.float().reshape(-1, V), logits0.float().reshape(-1, V)
    targets = y.reshape(-1)
    logp, logp0 = F.log_softmax(logits, -1), F.log_softmax(logits0, -1)
    stats = token_stats(logits, targets)
    m = {
        "nll": F.nll_loss(logp, targets, reduction="none"),  # nats
        "nll0": F.nll_loss(logp0, targets, reduction="none"),  # nats, unsettled (= T = 0)
        "surprise": stats["surprise"],  # bits
        "entropy": stats["entropy"],
        "varentropy": stats["varentropy"],
        "neg_max_prob": -logp.max(-1).values.exp(),  # negated so that larger means less sure
        # KL(settled ‖ unsettled) in nats; clamp the tiny negative rounding at identical logits
        "kl_settle": (logp.exp() * (logp - logp0)).sum(-1).clamp_min(0),
        "flip": (logits.argmax(-1) != logits0.argmax(-1)).double(),
    }
    if info is not None:
        units = model.config.n_layer * model.config.n_embd  # as PCGPT.uncertainty
        m["energy0"] = info["energy0"].reshape(-1) / units
        m["energy"] = info["energy"].reshape(-1) / units
        m["steps"] = info["steps"].reshape(-1)
        m["rejected"] = info["rejected"].reshape(-1)
    return {k: v.detach().double().cpu() for k, v in m.items()}


def spearman(signal: torch.Tensor, surprise: torch.Tensor):
    """Spearman ρ, or None when undefined (a constant signal, e.g. kl_settle at T = 0)."""
    from scipy.stats import spearmanr
    if signal.numel() < 2 or float(signal.max()) == float(signal.min()):
        return None
    rho = spearmanr(signal.numpy(), surprise.numpy())[0]
    return None if not math.isfinite(rho) else float(rho)


def summarise(m: dict[str, torch.Tensor], T: int, seconds: float, n_chars: int, pc: bool) -> dict:
    """One result row from the concatenated per-token measurements of one settle-steps value."""
    n = m["nll"].numel()
    loss = float(m["nll"].mean())
    row = {
        "settle_steps": T,
        "loss": loss,
        "perplexity": math.exp(loss),
        # total nats over the characters the targets decode to: per character for any tokenizer
        # (for a char tokenizer n_chars = n, i.e. loss / ln 2)
        "bits_per_char": float(m["nll"].sum()) / max(n_chars, 1) / _LN2,
        "delta_loss": loss - float(m["nll0"].mean()),
        "kl_settle": float(m["kl_settle"].mean()),
        "top1_flip_rate": float(m["flip"].mean()),
        "tokens_per_s": n / seconds if seconds > 0 else None,
        "seconds": seconds,
        "steps": float(m["steps"].mean()) if pc else 0.0,
        "rejection_rate": (float(m["rejected"].sum()) / float(m["steps"].sum())
                           if pc and float(m["steps"].sum()) > 0 else 0.0),
        "energy0": float(m["energy0"].mean()) if pc else None,
        "energy": float(m["energy"].mean()) if pc else None,
    }
    signals = BASE_SIGNALS + (PC_SIGNALS if pc else ())
    row["calibration"] = {s: spearman(m[s], m["surprise"]) for s in signals}
    return row


# --- the command --------------------------------------------------------------------------------

def settle_cost(T: int) -> int:
    """A settle-steps value's forward cost in baseline forwards: each settling step costs about
    three (the energy's forward, its gradient, the re-prediction), as pcgpt/model/pc.py computes it."""
    return 1 + 3 * T


def evaluate(model, tokenizer, data_path: str, settle_steps=(0,), split: str = "val", max_tokens: int | None = 20000,
             block_size: int | None = None, batch_size: int = 8, name: str | None = None) -> dict:
    """Evaluates the first max_tokens predictions of the split (None: all of them) for every
    settle-steps value. Says its cost on stderr before it starts, and its estimated time after
    the first batch."""
    from tqdm import tqdm
    pc = getattr(model, "model_type", "gpt") == "pc"
    block_size = block_size or model.config.block_size
    if not 0 < block_size <= model.config.block_size:
        raise ValueError(f"--block-size {block_size}: must be in 1..{model.config.block_size} (the model's context)")
    steps_list = sorted({int(t) for t in settle_steps}) or [0]
    if any(t < 0 for t in steps_list):
        raise ValueError(f"settle steps must be >= 0, got {steps_list}")
    note = None
    if not pc:
        # a baseline has no settling: every T would give the T = 0 numbers again
        if steps_list != [0]:
            note = f"baseline model (no settling): evaluated settle_steps=[0] only, not {steps_list}"
        steps_list = [0]

    try:
        ids = split_ids(tokenizer, data_path, split)
    except TokenizerError as e:  # text the model's vocabulary cannot encode
        raise ValueError(f"--data {data_path}: {e}") from None
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]  # +1: the last prediction's target
    if len(ids) < 2:
        raise ValueError(f"--data {data_path}: its {split} split has fewer than 2 tokens")
    device = model.lm_head.weight.device
    batches = make_batches(make_windows(ids, block_size), batch_size)
    n_tokens = len(ids) - 1
    n_chars = len(tokenizer.decode(ids[1:].tolist()))

    print(f"eval: {n_tokens:,} tokens of the {split} split x {len(steps_list)} settle-steps value(s) "
          f"{steps_list} = {len(steps_list) * len(batches)} batches of up to {batch_size} windows of {block_size}",
          file=sys.stderr, flush=True)
    model.eval()
    results = []
    bar = tqdm(total=len(steps_list) * len(batches), desc="eval", unit="batch", file=sys.stderr)
    said_estimate = False
    with torch.no_grad():  # settling takes its gradients w.r.t. z under its own enable_grad
        for T in steps_list:
            parts, seconds = [], 0.0
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                _sync(device)
                t0 = time.perf_counter()
                logits, logits0, info = forward_batch(model, x, T)
                _sync(device)
                seconds += time.perf_counter() - t0  # the forward incl. settling, not the statistics
                parts.append(token_measures(model, logits, logits0, info, y))
                bar.set_postfix(T=T)
                bar.update()
                if not said_estimate:  # later T cost more: tqdm's own ETA would assume they do not
                    said_estimate = True
                    per_forward = (time.perf_counter() - t0) / settle_cost(T)
                    total = per_forward * len(batches) * sum(settle_cost(t) for t in steps_list)
                    bar.write(f"eval: estimated time {total / 60:.1f} min", file=sys.stderr)
            m = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            results.append(summarise(m, T, seconds, n_chars, pc))
    bar.close()

    report = {"model": name, "model_type": getattr(model, "model_type", "gpt"), "split": split,
              "tokens": n_tokens, "characters": n_chars, "block_size": block_size, "batch_size": batch_size,
              "device": str(device), "results": results}
    if note:
        report["note"] = note
    return report


def record_eval(path, model, report: dict, command: str) -> dict:
    """Writes the report's loss at the model's default settle steps into a pcgpt checkpoint's
    config.json as its "eval" (what pcgpt inspect and /v1/models report as val_loss)."""
    import json
    from pathlib import Path
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--record: {path} is not a pcgpt checkpoint directory (no config.json)")
    T = getattr(model.config, "default_settle_steps", 0) if report["model_type"] == "pc" else 0
    row = next((r for r in report["results"] if r["settle_steps"] == T), None)
    if row is None:
        raise ValueError(f"--record: the model's default settle steps {T} is not among --settle-steps")
    record = {"split": f"val (last 10%), first {report['tokens']:,} tokens", "tokens": report["tokens"],
              "settle_steps": T, "val_loss": row["loss"], "bits_per_char": row["bits_per_char"], "command": command}
    config = json.loads(config_path.read_text())
    config["eval"] = record
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return record


# --- output -------------------------------------------------------------------------------------

def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_table(report: dict) -> str:
    """A markdown table of the results (one row per T) and one of the calibration."""
    pc = report["model_type"] == "pc"
    lines = [f"## {report['model']} ({report['model_type']}), {report['split']} split, "
             f"{report['tokens']} tokens, windows of {report['block_size']}"]
    if report.get("note"):
        lines += ["", report["note"]]
    cols = [("T", "settle_steps", "d"), ("loss", "loss", ".4f"), ("ppl", "perplexity", ".3f"),
            ("bpc", "bits_per_char", ".4f"), ("Δloss", "delta_loss", "+.4f"), ("KL", "kl_settle", ".3g"),
            ("flips", "top1_flip_rate", ".3f"), ("tok/s", "tokens_per_s", ".0f")]
    if pc:
        cols += [("steps", "steps", ".2f"), ("rejected", "rejection_rate", ".3f"),
                 ("E0/unit", "energy0", ".4g"), ("E/unit", "energy", ".4g")]
    lines += ["", "| " + " | ".join(c[0] for c in cols) + " |", "|" + "---:|" * len(cols)]
    for r in report["results"]:
        lines.append("| " + " | ".join(_fmt(r[key], spec) for _, key, spec in cols) + " |")

    signals = list(report["results"][0]["calibration"]) if report["results"] else []
    lines += ["", "Calibration: Spearman ρ of each signal against the target's surprise (−log2 p); "
              "– where undefined (a constant signal)", "",
              "| T | " + " | ".join(signals) + " |", "|" + "---:|" * (len(signals) + 1)]
    for r in report["results"]:
        lines.append(f"| {r['settle_steps']} | " + " | ".join(_fmt(r["calibration"][s], "+.3f") for s in signals) + " |")
    return "\n".join(lines)


def plot_results(report: dict, path: str) -> None:
    """PNG with two panels: loss and tokens/s against settle steps."""
    # Figure with an Agg canvas, not pyplot: no global backend state, works headless
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    T = [r["settle_steps"] for r in report["results"]]
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(T, [r["loss"] for r in report["results"]], "o-")
    ax1.set_xlabel("settle steps T")
    ax1.set_ylabel("loss (nats/token)")
    ax1.grid(alpha=0.3)
    ax2.plot(T, [r["tokens_per_s"] or 0.0 for r in report["results"]], "o-", color="tab:orange")
    ax2.set_xlabel("settle steps T")
    ax2.set_ylabel("tokens / s")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{report['model']} ({report['model_type']}, {report['split']}, {report['tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
