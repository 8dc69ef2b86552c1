"""1. Decode tokens/s against batch size: ours vs HF transformers' generate vs nanoGPT's way.

Every method gets the same prompts (B × prompt_len random ids), generates the same number of new
tokens greedily in fp32 on the same torch threads, and timestamps each new token. From the
timestamps: prefill time (start to first token), decode tokens/s = B·(N−1) / (t_N − t_1) (the
steady state, prefill excluded) and end-to-end tokens/s = B·N / t_N.

  ours     KV-cached: the B prompts prefilled together into their cache slots (as the engine
           admits a burst, up to its prefill token budget: model.generate.prefill_batch), then
           one batched decode step per token (model.generate.decode_step + sample_from_logits).
  hf       transformers GPT2LMHeadModel.generate(use_cache=True, do_sample=False), same weights.
  nanogpt  no cache: the whole window goes through the model for every token, head on the last
           position only (nanoGPT's generate).
Methods run interleaved within each repeat, so load drift hits all of them alike.
"""

import functools
import time

import torch
from tqdm import tqdm

from pcgpt.serve.engine import MAX_PREFILL_TOKENS
from bench.common import median, set_threads
from bench.roofline import MainMemoryProbe
from pcgpt.model.formats import inference_kernels
from pcgpt.model.generate import decode_step, kv_len_bucket, prefill_batch
from pcgpt.model.sampling import BatchSampling, SamplingParams, sample_from_logits

METHODS = ("ours", "hf", "nanogpt")


def run_ours(model, prompts: torch.Tensor, n_new: int, vocab: int, compiled=None):
    """Ours as the engine runs it: its steps in inference_kernels (the whole run here, where
    nothing else computes meanwhile; HF's runs keep PyTorch's defaults). compiled: a
    serve.compiled_step.CompiledDecode of the model (`pcgpt serve --compile`) for batch 1, whose
    cache the run uses."""
    with inference_kernels(model.lm_head.weight):
        return _run_ours(model, prompts, n_new, vocab, compiled)


@torch.no_grad()
def _run_ours(model, prompts: torch.Tensor, n_new: int, vocab: int, compiled=None):
    B, S = prompts.shape
    stamps = [time.perf_counter()]
    cache = model.new_cache(B, max_len=S + n_new) if compiled is None else compiled.cache
    step = functools.partial(decode_step, model) if compiled is None else (
        lambda token, pos, cache, kv_len: compiled(token, pos, kv_len))
    greedy = BatchSampling.from_params([SamplingParams(temperature=0.0)] * B, prompts.device)
    gens = [None] * B
    slots = torch.arange(B)
    group = max(1, MAX_PREFILL_TOKENS // S)  # the engine's groups for a burst of admissions
    logits = torch.cat([prefill_batch(model, list(prompts[b:b + group]), cache, slots[b:b + group])[0]
                        for b in range(0, B, group)])
    pos = torch.full((B,), S, dtype=torch.long)
    out = []
    for i in range(n_new):
        token = sample_from_logits(logits[:, :vocab], greedy, gens)
        out.append(token)
        stamps.append(time.perf_counter())
        if i + 1 == n_new:
            break
        logits, _ = step(token, pos, cache, kv_len=kv_len_bucket(S + i + 1, cache.max_len))
        pos += 1
    return torch.stack(out, 1), stamps


class _Stamps:
    """An HF streamer that only timestamps: put() gets the prompt first, then each new token."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def run_hf(hf, prompts: torch.Tensor, n_new: int, vocab: int):
    streamer = _Stamps()
    t0 = time.perf_counter()
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new, do_sample=False,
                      use_cache=True, streamer=streamer)
    return out[:, prompts.shape[1]:], [t0] + streamer.t[1:]


@torch.no_grad()
def run_nanogpt(model, prompts: torch.Tensor, n_new: int, vocab: int):
    block = model.config.block_size
    stamps = [time.perf_counter()]
    idx = prompts
    for _ in range(n_new):
        window = idx if idx.shape[1] <= block else idx[:, -block:]
        x = model.embed(window)
        for block_ in model.transformer.h:
            x = block_(x)  # no cache: causal attention over the whole window
        logits = model.head(x[:, -1])
        token = logits[:, :vocab].argmax(-1, keepdim=True)
        idx = torch.cat([idx, token], dim=1)
        stamps.append(time.perf_counter())
    return idx[:, prompts.shape[1]:], stamps


RUNNERS = {"ours": run_ours, "hf": run_hf, "nanogpt": run_nanogpt}


def summarise(stamps, B):
    n = len(stamps) - 1
    return {"prefill_s": stamps[1] - stamps[0],
            "decode_tok_s": B * (n - 1) / (stamps[-1] - stamps[1]) if n > 1 else float("nan"),
            "e2e_tok_s": B * n / (stamps[-1] - stamps[0]),
            "ms_per_step": 1000 * (stamps[-1] - stamps[1]) / max(n - 1, 1)}


def bench_model(name, ours, hf, vocab, plan, prompt_len, repeats, seed=0, bar=None, probe=None):
    """plan: list of (batch, new tokens, methods that run for it, repeats override or None).
    probe: at batch 1, called after each repeat's methods (the main-memory read rate in GB/s, so
    the bandwidth bound is measured between the decode runs it bounds)."""
    rows = []
    for B, n_new, methods, reps in plan:
        g = torch.Generator().manual_seed(seed + B)
        prompts = torch.randint(0, vocab, (B, prompt_len), generator=g)
        models = {"ours": ours, "hf": hf, "nanogpt": ours}
        for m in methods:  # warm-up: allocator, thread pool, first-call paths
            RUNNERS[m](models[m], prompts[:, :4], 2, vocab)
        runs = {m: [] for m in methods}
        tokens = {}
        reads = []
        for r in range(reps or repeats):
            for m in methods:
                toks, stamps = RUNNERS[m](models[m], prompts, n_new, vocab)
                runs[m].append(summarise(stamps, B))
                tokens[m] = toks
                if bar is not None:
                    bar.set_postfix_str(f"{name} B={B} {m}")
                    bar.update(1)
            if probe is not None and B == 1 and "ours" in methods:
                reads.append(probe())
        row = {"model": name, "batch": B, "prompt_len": prompt_len, "new_tokens": n_new, "repeats": reps or repeats}
        if reads:
            row["read_GBps_all"] = reads
        for m in methods:
            for k in ("prefill_s", "decode_tok_s", "e2e_tok_s", "ms_per_step"):
                row[f"{m}_{k}"] = median([x[k] for x in runs[m]])
            row[f"{m}_decode_tok_s_all"] = [x["decode_tok_s"] for x in runs[m]]
            if m != "ours" and "ours" in tokens:
                row[f"{m}_tokens_agree"] = float((tokens[m] == tokens["ours"]).float().mean())
        for m in methods:
            if m != "ours" and "ours" in methods:
                row[f"ours_over_{m}"] = row["ours_decode_tok_s"] / row[f"{m}_decode_tok_s"]
                row[f"ours_over_{m}_e2e"] = row["ours_e2e_tok_s"] / row[f"{m}_e2e_tok_s"]
        rows.append(row)
    return rows


def plans(quick: bool):
    if quick:
        return {"gpt2": [(1, 8, METHODS, 1), (4, 8, METHODS, 1)],
                "char": [(1, 16, METHODS, 1), (16, 16, METHODS, 1)],
                "gpt2-bf16": [(1, 8, ("ours", "hf"), 1)]}
    return {
        # GPT-2 124M: larger batches get fewer tokens, and nanoGPT's way (which recomputes the
        # window: ~B·window tokens of compute per step) fewer repeats, so the run stays bounded
        "gpt2": [(1, 64, METHODS, 5), (4, 64, METHODS, 3), (16, 32, ("ours", "hf"), 3), (16, 32, ("nanogpt",), 1),
                 (64, 16, ("ours", "hf"), 2), (64, 16, ("nanogpt",), 1)],
        "char": [(1, 128, METHODS, 5), (4, 128, METHODS, 5), (16, 128, METHODS, 5), (64, 128, METHODS, 5)],
        # the same GPT-2 weights in bf16 (`pcgpt serve --dtype bfloat16`), next to HF in bf16
        "gpt2-bf16": [(1, 64, ("ours", "hf"), 5), (4, 64, ("ours", "hf"), 3), (16, 32, ("ours", "hf"), 3),
                      (64, 16, ("ours", "hf"), 2)],
    }


def merge(rows):
    """Rows of the same (model, batch) measured in separate groups become one row."""
    out = {}
    for r in rows:
        key = (r["model"], r["batch"])
        if key in out:
            base = out[key]
            for k, v in r.items():
                if k not in base:
                    base[k] = v
            for m in METHODS:
                if m != "ours" and f"{m}_decode_tok_s" in base and "ours_decode_tok_s" in base:
                    base[f"ours_over_{m}"] = base["ours_decode_tok_s"] / base[f"{m}_decode_tok_s"]
                    base[f"ours_over_{m}_e2e"] = base["ours_e2e_tok_s"] / base[f"{m}_e2e_tok_s"]
        else:
            out[key] = dict(r)
    return list(out.values())


def run(quick=False, prompt_len=16):
    from bench.models import char_pair, check_logits, gpt2_pair
    threads = set_threads()
    torch.manual_seed(0)
    result = {"threads": threads, "prompt_len": prompt_len, "dtype": "float32 (gpt2-bf16: bfloat16)", "rows": [],
              "logit_check": {}}
    p = plans(quick)
    total = sum((reps or 3) for plan in p.values() for _, _, methods, reps in plan for _ in methods)
    with tqdm(total=total, desc="1 decode", unit="run") as bar:
        for name, build in (("char", char_pair), ("gpt2", gpt2_pair),
                            ("gpt2-bf16", functools.partial(gpt2_pair, dtype=torch.bfloat16))):
            ours, hf, tok = build()
            vocab = tok.vocab_size
            result["logit_check"][name] = check_logits(ours, hf, vocab)
            probe = MainMemoryProbe(256 if quick else 1024) if name == "gpt2" else None
            rows = bench_model(name, ours, hf, vocab, p[name], prompt_len, repeats=3, bar=bar, probe=probe)
            result["rows"] += merge(rows)
            del ours, hf, probe
    return result
