"""`pcgpt compare`: standard and predictive-coding checkpoints side by side on one text.

Every model runs on the same held-out windows (nanoGPT's last 10% of --data), each PC model at
each settle-steps value T (a baseline once: it has no settling). For each (model, T):

- held-out loss, perplexity and bits per char, with the FLOPs per token measured by PyTorch's
  FlopCounterMode over one batch (matmuls and attention, forward and, for settling, the backward
  passes it takes w.r.t. the states): the loss-versus-compute plot;
- calibration of the top-1 probability: expected calibration error (equal-width bins), the
  reliability diagram, the (multi-class) Brier score;
- uncertainty quality: Spearman ρ of each per-token signal with the true token's surprise, and
  the AUROC of each signal for a top-1 error; "combined" is a least-squares combination of the
  standardised signals, fitted on half of the windows and scored on the other half (cross-fitted,
  so it cannot win by fitting the data it is scored on);
- out-of-distribution detection: the per-window mean of each signal, and the AUROC that separates
  held-out windows of --data from windows of texts made locally from it and from files on this
  machine (see ood_texts);
- samples (once per model, at its default T): standard sampling at temperature 1 and the
  error-driven sampler with its target surprise τ set so that both end at the same mean surprise;
  repetition, distinct-n, invented words, speaker-format validity and the sampler's μ against τ.

Everything here computes; the command (pcgpt/cli_compare.py) only parses flags and writes files.
"""

import dataclasses
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcgpt.model.compare_config import CompareConfig  # noqa: F401  (torch-free, for the CLI's help)
from pcgpt.model.evaluate import forward_batch, make_batches, make_windows, spearman, token_measures

_LN2 = math.log(2.0)

# per-token signals, each oriented so that larger means "less sure"
BASE_SIGNALS = ("entropy", "neg_max_prob", "varentropy")
PC_SIGNALS = ("energy0", "energy", "kl_settle")


# --- metrics (pure functions over arrays) ---------------------------------------------------------

def expected_calibration_error(confidence, correct, bins: int = 15):
    """ECE with equal-width bins over [0, 1]: Σ_b (n_b / N)·|accuracy_b − confidence_b|.
    Returns (ece, rows) with one row (lo, hi, count, mean confidence, accuracy) per non-empty bin."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, rows = 0.0, []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        if n == 0:
            continue
        conf, acc = float(confidence[sel].mean()), float(correct[sel].mean())
        ece += n / len(confidence) * abs(acc - conf)
        rows.append((float(edges[b]), float(edges[b + 1]), n, conf, acc))
    return ece, rows


def brier_scores(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-class Brier score per row: Σ_k (p_k − [k = y])² = Σ p² − 2·p_y + 1."""
    return probs.square().sum(-1) - 2 * probs.gather(-1, targets.view(-1, 1)).squeeze(-1) + 1


def auroc(scores, labels):
    """Area under the ROC curve of `scores` for the positives of `labels` (ties count half):
    the Mann-Whitney U over average ranks. None when a class is empty."""
    from scipy.stats import rankdata
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cross_fitted_combination(signals: dict, target, fold) -> np.ndarray:
    """A linear combination of the standardised signals predicting `target`, fitted by least
    squares on fold 0 and applied to fold 1 and vice versa (fold: 0/1 per row)."""
    X = np.stack([np.asarray(v, dtype=np.float64) for v in signals.values()], axis=1)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    X = np.concatenate([X, np.ones((len(X), 1))], axis=1)
    y, fold = np.asarray(target, dtype=np.float64), np.asarray(fold)
    out = np.empty(len(y))
    for f in (0, 1):
        fit, use = fold == f, fold != f
        w, *_ = np.linalg.lstsq(X[fit], y[fit], rcond=None)
        out[use] = X[use] @ w
    return out


# --- samples ------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def repeated_ngram_share(tokens: list, n: int = 3) -> float | None:
    """Share of the n-grams that occur more than once in the sequence."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    counts: dict = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return sum(1 for g in grams if counts[g] > 1) / len(grams)


def distinct_n(tokens: list, n: int) -> float | None:
    """Distinct n-grams over all n-grams."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def invented_word_share(tokens: list[str], known: set[str]) -> float | None:
    return sum(1 for w in tokens if w not in known) / len(tokens) if tokens else None


_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*)*:$")


def speaker_format_validity(text: str) -> float | None:
    """Share of the complete blocks (between blank lines; a sample's first and last are cut off)
    that are a play's speech: a speaker line "NAME:" then at least one line of text."""
    blocks = text.split("\n\n")[1:-1]
    blocks = [b.strip("\n") for b in blocks if b.strip()]
    if not blocks:
        return None

    def valid(block):
        lines = block.split("\n")
        return len(lines) >= 2 and bool(_SPEAKER.match(lines[0])) and all(line.strip() for line in lines[1:])

    return sum(valid(b) for b in blocks) / len(blocks)


# --- out-of-distribution texts ------------------------------------------------------------------

def to_vocabulary(text: str, tokenizer) -> str:
    """The text in the tokenizer's characters: for a char vocabulary, accents stripped (NFKD) and
    each run of other unknown characters made one space; other tokenizers take any text."""
    import unicodedata
    stoi = getattr(tokenizer, "stoi", None)
    if stoi is None:
        return text
    out, replacing = [], False
    for ch in unicodedata.normalize("NFKD", text):
        if ch in stoi:
            out.append(ch)
            replacing = False
        elif not unicodedata.combining(ch) and not replacing:
            out.append(" ")
            replacing = True
    return "".join(out)


def _stdlib_source(min_chars: int) -> str:
    import argparse
    import json.decoder
    import logging
    import textwrap
    parts = []
    for mod in (argparse, textwrap, logging, json.decoder):
        parts.append(Path(mod.__file__).read_text(encoding="utf-8"))
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n".join(parts)


def _project_prose() -> tuple[str, str]:
    """English prose: the project's docs/architecture.md when run from a checkout, else the
    standard library's module docstrings (a wheel install has no docs/)."""
    path = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        # markdown syntax is not prose: drop code blocks, tables and markup characters
        text = re.sub(r"```.*?```", " ", text, flags=re.S)
        text = "\n".join(line for line in text.split("\n") if not line.lstrip().startswith("|"))
        return re.sub(r"[#*`_|>\[\]()]", " ", text), "docs/architecture.md of this checkout, markdown removed"
    import argparse
    import collections
    import email
    import http
    import json
    import logging
    import textwrap
    docs_text = "\n\n".join(m.__doc__ or "" for m in (argparse, collections, email, http, json, logging, textwrap))
    return docs_text, "module docstrings of the Python standard library"


def ood_texts(reference: str, tokenizer, min_chars: int, seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """Texts the model never saw, each at least min_chars long where its source allows: made from
    `reference` (held-out text of --data) by shuffling its characters, its words, or reversing its
    lines; Python source from the standard library; English prose. All mapped to the model's
    vocabulary. Returns (texts, how each was made)."""
    rng = random.Random(seed)
    chars = list(reference)
    rng.shuffle(chars)
    lines = reference.split("\n")
    toks = reference.split()
    rng.shuffle(toks)
    it = iter(toks)
    word_shuffled = "\n".join(" ".join(next(it) for _ in line.split()) for line in lines)
    prose, prose_source = _project_prose()
    texts = {
        "char-shuffled": "".join(chars),
        "word-shuffled": word_shuffled,
        "reversed lines": "\n".join(line[::-1] for line in lines),
        "python source": _stdlib_source(min_chars * 2),
        "english prose": prose,
    }
    made = {
        "char-shuffled": "the held-out text's characters in random order",
        "word-shuffled": "the held-out text's words in random order, line lengths kept",
        "reversed lines": "each held-out line written backwards",
        "python source": "argparse, textwrap, logging, json/decoder.py of the standard library",
        "english prose": prose_source,
    }
    return {k: to_vocabulary(v, tokenizer) for k, v in texts.items()}, made


# --- measuring ----------------------------------------------------------------------------------

@dataclass
class Entry:
    """One loaded checkpoint."""
    name: str
    model: torch.nn.Module
    tokenizer: object

    @property
    def pc(self) -> bool:
        return getattr(self.model, "model_type", "gpt") == "pc"


def measure_batch(model, x, y, T) -> dict[str, torch.Tensor]:
    """Per-token measurements of one batch (flat), as evaluate.token_measures plus the top-1
    probability, whether it was right, and the Brier score."""
    logits, logits0, info = forward_batch(model, x, T)
    m = token_measures(model, logits, logits0, info, y)
    probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), -1)
    targets = y.reshape(-1).to(probs.device)
    m["p_max"] = probs.max(-1).values.double().cpu()
    m["correct"] = (probs.argmax(-1) == targets).double().cpu()
    m["brier"] = brier_scores(probs, targets).double().cpu()
    m["window"] = torch.arange(x.shape[0]).repeat_interleave(x.shape[1]).double()
    return m


class FlopCount:
    """Counts the FLOPs of the ops PyTorch's flop counter knows (matmuls, attention), forward and
    backward, as they dispatch: `with FlopCount() as c: ...; c.total`. (FlopCounterMode itself
    tracks modules with backward hooks, which autograd.grad on the settling states does not
    support.) Attention is counted over every key, masked or not, as its kernels compute it."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry
        aten = torch.ops.aten
        # the CPU's fused attention kernels are missing from the registry; their leading arguments
        # are those of the flash kernels it has, and so are their FLOPs
        cpu_attention = {
            aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                flop_registry[aten._scaled_dot_product_flash_attention_backward]}
        counter = self
        counter.total = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                if packet in cpu_attention:  # (query, key, value) / (grad_out, query, key, value, out, logsumexp)
                    counter.total += cpu_attention[packet](*args[:6], out_val=out)
                elif packet in flop_registry:
                    counter.total += flop_registry[packet](*args, **kwargs, out_val=out)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def flops_per_token(model, x, T) -> float:
    """Measured FLOPs per token of the forward (settling included) over one batch."""
    with FlopCount() as count:
        forward_batch(model, x, T)
    return count.total / x.numel()


def measure(model, batches, T, bar=None) -> dict[str, torch.Tensor]:
    parts, offset = [], 0
    for x, y in batches:
        device = model.lm_head.weight.device
        m = measure_batch(model, x.to(device), y.to(device), T)
        m["window"] += offset
        offset += x.shape[0]
        parts.append(m)
        if bar is not None:
            bar.update()
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def signals_of(m: dict, pc: bool) -> list[str]:
    return list(BASE_SIGNALS) + ([s for s in PC_SIGNALS if s in m] if pc else [])


def held_out_row(m: dict, n_chars: int, bins: int) -> dict:
    loss = float(m["nll"].mean())
    ece, reliability = expected_calibration_error(m["p_max"].numpy(), m["correct"].numpy(), bins)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": float(m["nll"].sum()) / n_chars / _LN2,
            "top1_accuracy": float(m["correct"].mean()), "ece": ece, "brier": float(m["brier"].mean()),
            "reliability": reliability}


def uncertainty_row(m: dict, names: list[str]) -> dict:
    surprise = m["surprise"].numpy()
    error = 1.0 - m["correct"].numpy()
    usable = {s: m[s].numpy() for s in names if float(m[s].max()) > float(m[s].min())}
    fold = (m["window"].numpy() % 2).astype(int)
    combined = cross_fitted_combination(usable, surprise, fold) if usable else None
    rho = {s: spearman(m[s], m["surprise"]) for s in names}
    err = {s: auroc(m[s].numpy(), error) if s in usable else None for s in names}
    if combined is not None:
        rho["combined"] = spearman(torch.from_numpy(combined), m["surprise"])
        err["combined"] = auroc(combined, error)
    return {"spearman_surprise": rho, "auroc_error": err}


def per_window_means(m: dict, names: list[str]) -> dict[str, np.ndarray]:
    w = m["window"].long()
    n = int(w.max()) + 1
    out = {}
    for s in names + ["surprise"]:
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, w, m[s])
        out[s] = (sums / torch.bincount(w, minlength=n).double()).numpy()
    return out


def ood_row(in_means: dict, ood_means: dict[str, dict]) -> dict:
    """AUROC per signal (rows) and OOD text (columns): OOD windows are the positives."""
    table = {}
    for s in in_means:
        table[s] = {}
        for name, means in ood_means.items():
            scores = np.concatenate([in_means[s], means[s]])
            labels = np.concatenate([np.zeros(len(in_means[s]), bool), np.ones(len(means[s]), bool)])
            table[s][name] = auroc(scores, labels)
        vals = [v for v in table[s].values() if v is not None]
        table[s]["mean"] = float(np.mean(vals)) if vals else None
    return table


# --- sampling -----------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, prompt_ids: list[int], rows: int, n_tokens: int, settle_steps, seed: int,
           temperature: float = 1.0, tau: float | None = None, bar=None) -> dict:
    """`rows` sequences of n_tokens from one prompt, batched through prefill and decode_step as the
    engine runs them: standard sampling at `temperature`, or (tau given) the error-driven sampler.
    Returns the token ids per row, the surprise of each chosen token under the model's raw
    distribution (bits) and, for the error-driven sampler, its threshold μ at each step."""
    from pcgpt.model.formats import inference_kernels
    from pcgpt.model.generate import decode_step, kv_len_bucket, prefill
    from pcgpt.model.sampling import (BatchSampling, ErrorDrivenParams, ErrorDrivenState, SamplingParams,
                                      make_generator, sample_from_logits)
    device = model.lm_head.weight.device
    n_tokens = min(n_tokens, model.config.block_size - len(prompt_ids))
    cache = model.new_cache(rows, max_len=len(prompt_ids) + n_tokens)
    prompt = torch.tensor(prompt_ids, device=device)
    batch = BatchSampling.from_params([SamplingParams(temperature=temperature)] * rows, device)
    generators = [make_generator(seed + r, device) for r in range(rows)]
    ed = None
    if tau is not None:
        ed = ErrorDrivenState(rows, device)
        ed.admit(torch.arange(rows, device=device),
                 torch.tensor([ErrorDrivenState.initial_row(ErrorDrivenParams(tau=tau))] * rows))
    with inference_kernels(model.lm_head.weight):
        logits = torch.stack([prefill(model, prompt, cache, r, settle_steps)[0] for r in range(rows)])
    steps = None if settle_steps is None else torch.full((rows,), settle_steps, device=device)
    pos = torch.full((rows,), len(prompt_ids), device=device)
    tokens, surprise, mu = [], [], []
    for i in range(n_tokens):
        raw = logits.float()
        x, temp = raw, batch.temperature
        if ed is not None:
            x, temp, step = ed.apply(raw, raw, batch.temperature, slice(0, rows))
            mu.append(step["mu"].cpu())
        chosen = sample_from_logits(x, dataclasses.replace(batch, temperature=temp), generators)
        if ed is not None:
            ed.update(step, x, temp, chosen, slice(0, rows))
        surprise.append((-torch.log_softmax(raw, -1).gather(1, chosen[:, None]).squeeze(1) / _LN2).cpu())
        tokens.append(chosen.cpu())
        if bar is not None:
            bar.update()
        if i + 1 == n_tokens:
            break
        with inference_kernels(model.lm_head.weight):
            logits, _ = decode_step(model, chosen, pos, cache, steps, kv_len=kv_len_bucket(int(pos[0]) + 1, cache.max_len),
                                    max_settle_steps=settle_steps)
        pos += 1
    out = {"tokens": torch.stack(tokens, 1), "surprise": torch.stack(surprise, 1)}
    if mu:
        out["mu"] = torch.stack(mu, 1)
    return out


def sample_row(tokenizer, prompt: str, run: dict, known: set[str]) -> dict:
    texts = [prompt + tokenizer.decode(r.tolist()) for r in run["tokens"]]
    per_text = [(words(t), t) for t in texts]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "mean_surprise": float(run["surprise"].mean()),
        "repeated_3grams": mean(repeated_ngram_share(w, 3) for w, _ in per_text),
        "distinct_1": mean(distinct_n(w, 1) for w, _ in per_text),
        "distinct_2": mean(distinct_n(w, 2) for w, _ in per_text),
        "invented_words": mean(invented_word_share(w, known) for w, _ in per_text),
        "speaker_format": mean(speaker_format_validity(t) for _, t in per_text),
        "example": texts[0],
    }


# --- the comparison -----------------------------------------------------------------------------

def compare(entries: list[Entry], data_path: str, cfg: CompareConfig, progress: bool = True) -> dict:
    """Runs every measurement; returns a JSON-able dict that format_report and write_plots read."""
    from tqdm import tqdm
    from pcgpt.model.train import load_text_splits
    if not entries:
        raise ValueError("compare needs at least one model")
    steps_list = sorted({int(t) for t in cfg.settle_steps})
    if not steps_list or any(t < 0 for t in steps_list):
        raise ValueError(f"--settle-steps must be integers >= 0, got {cfg.settle_steps}")
    plans, t_start = [], time.perf_counter()
    for e in entries:
        T_values = steps_list if e.pc else [0]
        if e.pc:
            too_many = [t for t in T_values if t > e.model.config.max_settle_steps]
            if too_many:
                raise ValueError(f"{e.name}: settle steps {too_many} exceed its max_settle_steps "
                                 f"{e.model.config.max_settle_steps}")
        plans.append((e, T_values))

    # the data each model reads, in its own tokenizer's ids (the models may differ)
    prepared = {}
    for e, _ in plans:
        _, val_ids = load_text_splits(data_path, e.tokenizer)
        ids = val_ids[:cfg.max_tokens + 1]
        if len(ids) < 2:
            raise ValueError(f"the held-out 10% of {data_path} has fewer than 2 tokens")
        block = e.model.config.block_size
        win = min(cfg.ood_window, block)
        ood_in = val_ids[-(cfg.ood_windows * win + 1):]  # the end of the split: apart from the first windows
        val_text = e.tokenizer.decode(val_ids.tolist())
        texts, made = ood_texts(val_text, e.tokenizer, cfg.ood_windows * win + 1, cfg.seed)
        ood_sets = {"in-distribution": ood_in}
        for name, t in texts.items():
            ood_sets[name] = torch.tensor(e.tokenizer.encode(t)[:cfg.ood_windows * win + 1], dtype=torch.long)
        prepared[e.name] = {
            "batches": make_batches(make_windows(ids, block), cfg.batch_size),
            "n_tokens": len(ids) - 1, "n_chars": len(e.tokenizer.decode(ids[1:].tolist())),
            "ood": {k: make_batches([w for w in make_windows(v, win) if len(w[0]) == win], cfg.batch_size)
                    for k, v in ood_sets.items()},
            "ood_made": made,
        }
    train_words = set(words(entries[0].tokenizer.decode(load_text_splits(data_path, entries[0].tokenizer)[0].tolist())))

    units = 0
    for e, T_values in plans:
        p = prepared[e.name]
        units += len(T_values) * (len(p["batches"]) + sum(len(b) for b in p["ood"].values()))
        units += 3 * cfg.sample_tokens  # three sampling runs (sample_comparison)
    bar = tqdm(total=units, desc="compare", unit="step", file=sys.stderr, disable=not progress)

    rows, samples = [], []
    model_info = []
    for e, T_values in plans:
        p = prepared[e.name]
        e.model.eval()
        params = sum(t.numel() for t in e.model.parameters())
        model_info.append({"name": e.name, "model_type": "pc" if e.pc else "gpt", "parameters": params,
                           "settle_steps": T_values})
        for T in T_values:
            bar.set_postfix_str(f"{e.name} T={T}")
            with torch.no_grad():
                x0 = p["batches"][0][0].to(e.model.lm_head.weight.device)
                flops = flops_per_token(e.model, x0, T)
                t0 = time.perf_counter()
                m = measure(e.model, p["batches"], T, bar)
                seconds = time.perf_counter() - t0
                names = signals_of(m, e.pc)
                ood_means = {k: per_window_means(measure(e.model, b, T, bar), names) for k, b in p["ood"].items()}
            in_means = ood_means.pop("in-distribution")
            row = {"model": e.name, "model_type": "pc" if e.pc else "gpt", "settle_steps": T,
                   "parameters": params, "flops_per_token": flops, "tokens": p["n_tokens"], "seconds": seconds,
                   **held_out_row(m, p["n_chars"], cfg.bins), **uncertainty_row(m, names),
                   "ood_auroc": ood_row(in_means, ood_means)}
            rows.append(row)
        samples.append(sample_comparison(e, cfg, train_words, bar))
    bar.close()
    first = prepared[entries[0].name]
    return {"data": str(data_path), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in cfg.__dict__.items()},
            "tokens": first["n_tokens"], "ood_sources": first["ood_made"], "models": model_info,
            "rows": rows, "samples": samples, "seconds": time.perf_counter() - t_start,
            "threads": torch.get_num_threads()}


def sample_comparison(e: Entry, cfg: CompareConfig, known: set[str], bar=None) -> dict:
    """Standard sampling (temperature 1) against the error-driven sampler at the same mean
    surprise: τ starts at the standard run's mean surprise and is corrected once by the gap."""
    T = e.model.config.default_settle_steps if e.pc else None
    prompt = "\n"
    prompt_ids = e.tokenizer.encode(prompt)
    standard = sample(e.model, prompt_ids, cfg.sample_rows, cfg.sample_tokens, T, cfg.seed, bar=bar)
    target = float(standard["surprise"].mean())
    tau = target
    ed = sample(e.model, prompt_ids, cfg.sample_rows, cfg.sample_tokens, T, cfg.seed, tau=tau, bar=bar)
    tau = max(0.05, tau + target - float(ed["surprise"].mean()))
    ed = sample(e.model, prompt_ids, cfg.sample_rows, cfg.sample_tokens, T, cfg.seed, tau=tau, bar=bar)
    running = ed["surprise"].cumsum(1) / torch.arange(1, ed["surprise"].shape[1] + 1)
    return {"model": e.name, "settle_steps": T or 0, "tau": tau,
            "standard": sample_row(e.tokenizer, prompt, standard, known),
            "error_driven": sample_row(e.tokenizer, prompt, ed, known),
            "trajectory": {"mu": ed["mu"].mean(0).tolist(), "running_surprise": running.mean(0).tolist()}}


# --- the report ---------------------------------------------------------------------------------

def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _label(row: dict) -> str:
    return f"{row['model']} T={row['settle_steps']}" if row["model_type"] == "pc" else row["model"]


def headline(result: dict, margin: float = 0.01) -> list[str]:
    """Whether a PC row beats every baseline on held-out loss by `margin` nats, and whether a PC
    signal beats entropy at OOD detection (mean AUROC over the OOD texts), in sentences."""
    rows = result["rows"]
    pcs = [r for r in rows if r["model_type"] == "pc"]
    bases = [r for r in rows if r["model_type"] == "gpt"]
    lines = []
    if pcs and bases:
        best = min(pcs, key=lambda r: r["loss"])
        for b in bases:
            gap = b["loss"] - best["loss"]
            verdict = "beats" if gap >= margin else "does not beat"
            lines.append(f"- Best PC row ({_label(best)}, {best['loss']:.4f} nats/token) {verdict} "
                         f"{b['model']} ({b['loss']:.4f}) by ≥ {margin} nats: it is {abs(gap):.4f} "
                         f"{'lower' if gap >= 0 else 'higher'}.")
    for r in pcs:
        if r["settle_steps"] == 0:  # kl_settle is constant there
            continue
        ood = r["ood_auroc"]
        ent = ood["entropy"]["mean"]
        pc_best = max(((s, ood[s]["mean"]) for s in PC_SIGNALS if s in ood and ood[s]["mean"] is not None),
                      key=lambda kv: kv[1], default=None)
        if pc_best is None or ent is None:
            continue
        verdict = "beats" if pc_best[1] > ent else "does not beat"
        lines.append(f"- {_label(r)}: the best PC signal at OOD detection, {pc_best[0]} (mean AUROC "
                     f"{pc_best[1]:.3f}), {verdict} entropy ({ent:.3f}).")
    return lines


def format_report(result: dict, plots: dict[str, str] | None = None) -> str:
    """The comparison as markdown: the tables, and the plots by their file names."""
    cfg = result["config"]
    rows = result["rows"]
    L = ["# pcgpt compare", "",
         f"Data: `{result['data']}` (held-out: the last 10%), {result['tokens']} held-out tokens per row, "
         f"OOD: {cfg['ood_windows']} windows of {cfg['ood_window']} tokens per text, samples: "
         f"{cfg['sample_rows']} × {cfg['sample_tokens']} tokens per sampler, seed {cfg['seed']}, "
         f"{result['threads']} threads, {result['seconds']:.0f} s in all.", ""]
    L += ["## Headline", ""] + (headline(result) or ["- (needs a PC model and a baseline)"]) + [""]

    L += ["## Held-out loss and compute", "",
          "FLOPs/token: measured with torch's FlopCounterMode over one batch of windows (matmuls and "
          "attention; settling's backward passes included).", "",
          "| model | T | parameters | FLOPs/token | loss (nats) | ppl | bits/char | top-1 acc |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['model']} | {r['settle_steps'] if r['model_type'] == 'pc' else '–'} | {r['parameters']:,} | "
                 f"{r['flops_per_token'] / 1e6:.2f} M | {r['loss']:.4f} | {r['perplexity']:.3f} | "
                 f"{r['bits_per_char']:.4f} | {r['top1_accuracy']:.4f} |")
    if plots and "loss" in plots:
        L += ["", f"![loss against compute]({plots['loss']})"]

    L += ["", "## Calibration of the top-1 probability", "",
          f"ECE over {cfg['bins']} equal-width bins; Brier: Σ_k (p_k − [k = y])², mean over tokens.", "",
          "| row | ECE | Brier |", "|---|---:|---:|"]
    for r in rows:
        L.append(f"| {_label(r)} | {r['ece']:.4f} | {r['brier']:.4f} |")
    if plots and "reliability" in plots:
        L += ["", f"![reliability diagram]({plots['reliability']})"]

    signals = list(BASE_SIGNALS) + list(PC_SIGNALS) + ["combined"]
    for key, title, note in (
            ("spearman_surprise", "Uncertainty: Spearman ρ with the true token's surprise",
             "Each signal per token, larger = less sure; – where a signal is constant (kl_settle at T = 0) "
             "or absent (baselines have no PC signals). combined: least squares over the row's signals, "
             "cross-fitted over even/odd windows."),
            ("auroc_error", "Uncertainty: AUROC for a top-1 error", "Positives: tokens whose top-1 guess is wrong.")):
        L += ["", f"## {title}", "", note, "", "| row | " + " | ".join(signals) + " |",
              "|---|" + "---:|" * len(signals)]
        for r in rows:
            L.append(f"| {_label(r)} | " + " | ".join(_f(r[key].get(s), ".3f") for s in signals) + " |")

    L += ["", "## Out-of-distribution detection", "",
          "AUROC of the per-window mean of each signal, held-out windows (negatives) against windows of "
          "each text (positives). surprise needs the true next tokens (it is the likelihood detector); "
          "the others read only the model's predictions. The texts:", ""]
    L += [f"- {k}: {v}" for k, v in result["ood_sources"].items()]
    if plots and "ood" in plots:
        L += ["", f"![OOD AUROC]({plots['ood']})"]
    for r in rows:
        ood = r["ood_auroc"]
        texts = [k for k in next(iter(ood.values()))]
        L += ["", f"### {_label(r)}", "", "| signal | " + " | ".join(texts) + " |", "|---|" + "---:|" * len(texts)]
        for s, by_text in ood.items():
            L.append(f"| {s} | " + " | ".join(_f(by_text[t], ".3f") for t in texts) + " |")

    L += ["", "## Samples: standard vs error-driven at matched mean surprise", "",
          "Prompt: a newline. standard: temperature 1. error-driven: the error-driven sampler with its target "
          "τ set (one correction) so that its mean surprise under the model's raw distribution matches the "
          "standard run's. Word statistics per sequence, averaged: repeated 3-grams = share of word 3-grams "
          "occurring twice or more; invented = share of words not in the training split; speaker format = "
          "share of complete blocks that are `NAME:` then text.", "",
          "| model | T | sampler | τ | mean surprise (bits) | repeated 3-grams | distinct-1 | distinct-2 | invented | speaker format |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["samples"]:
        for kind in ("standard", "error_driven"):
            v = s[kind]
            tau = _f(s["tau"], ".2f") if kind == "error_driven" else "–"
            L.append(f"| {s['model']} | {s['settle_steps']} | {kind.replace('_', '-')} | {tau} | {v['mean_surprise']:.3f} | "
                     f"{_f(v['repeated_3grams'], '.3f')} | {_f(v['distinct_1'], '.3f')} | {_f(v['distinct_2'], '.3f')} | "
                     f"{_f(v['invented_words'], '.3f')} | {_f(v['speaker_format'], '.2f')} |")
    if plots and "trajectory" in plots:
        L += ["", f"![surprise trajectory]({plots['trajectory']})"]
    for s in result["samples"]:
        for kind in ("standard", "error_driven"):
            L += ["", f"{s['model']}, {kind.replace('_', '-')} (first sequence):", "", "```",
                  s[kind]["example"].strip("\n")[:600], "```"]
    return "\n".join(L) + "\n"


def write_plots(result: dict, out_dir: str | Path) -> dict[str, str]:
    """PNG plots into out_dir; returns {kind: file name}."""
    # Figures on Agg canvases, not pyplot: no global backend state, works headless
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    out_dir = Path(out_dir)
    rows = result["rows"]
    files = {}

    def save(fig, kind, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        files[kind] = name

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        ax.plot([r["flops_per_token"] / 1e6 for r in rs], [r["loss"] for r in rs], "o-" if len(rs) > 1 else "s",
                label=model)
        if len(rs) > 1:
            for r in rs:
                ax.annotate(f"T={r['settle_steps']}", (r["flops_per_token"] / 1e6, r["loss"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per token (millions, measured)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "loss", "loss_vs_flops.png")

    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for r in rows:
        rel = r["reliability"]
        ax.plot([b[3] for b in rel], [b[4] for b in rel], "o-", ms=3, label=f"{_label(r)} (ECE {r['ece']:.3f})")
    ax.set_xlabel("top-1 probability (bin mean)")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save(fig, "reliability", "reliability.png")

    signals = list(dict.fromkeys(s for r in rows for s in r["ood_auroc"]))
    grid = np.array([[r["ood_auroc"].get(s, {}).get("mean") if r["ood_auroc"].get(s, {}).get("mean") is not None
                      else np.nan for s in signals] for r in rows], dtype=float)
    fig = Figure(figsize=(1.2 * len(signals) + 3, 0.32 * len(rows) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu_r", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(signals)), signals, fontsize=8)
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
    ax.set_title("mean AUROC over the OOD texts (0.5 = chance; below 0.5: lower on OOD text)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    save(fig, "ood", "ood_auroc.png")

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for s in result["samples"]:
        traj = s["trajectory"]
        line, = ax.plot(traj["mu"], lw=1, label=f"{s['model']}: μ")
        ax.plot(traj["running_surprise"], lw=1, ls=":", color=line.get_color(), label=f"{s['model']}: running mean surprise")
        ax.axhline(s["tau"], lw=0.8, ls="--", color=line.get_color())
    ax.set_xlabel("token")
    ax.set_ylabel("bits (dashed: τ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save(fig, "trajectory", "surprise_trajectory.png")
    return files


def write_report(result: dict, out_dir: str | Path) -> Path:
    """report.md, results.json and the PNGs into out_dir (created)."""
    import json
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(result, out_dir)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    path = out_dir / "report.md"
    path.write_text(format_report(result, plots), encoding="utf-8")
    return path
