"""4. Memory: KV-cache bytes against context length and batch (against 2·layers·d_model·bytes per
token and slot), process RSS, and the peak RSS of a long run.

The RSS numbers come from a fresh child process (`python -m bench.memory --child`), so nothing the
other benchmarks allocated counts: RSS after importing torch, after loading each model, after
allocating and touching a KV cache (the physical check of the formula), and during a long run
of the real engine (sampled every 20 ms, plus the peak, VmHWM).
"""

import asyncio
import json
import subprocess
import sys
import threading
import time

import torch

from bench.common import CHAR_CKPT, peak_rss_bytes, rss_bytes

CONTEXTS = (64, 128, 256, 512, 1024)
BATCHES = (1, 8, 64)


def formula_table():
    """KVCache.nbytes (the allocated tensors) against the formula, on the meta device (no memory)."""
    from pcgpt.model.gpt import KVCache, preset_config
    rows = []
    for preset in ("gpt2", "char-small"):
        c = preset_config(preset)
        for dtype in (torch.float32, torch.bfloat16):
            per_token = 2 * c.n_layer * c.n_embd * torch.tensor([], dtype=dtype).element_size()
            for B in BATCHES:
                for T in CONTEXTS:
                    if T > c.block_size:
                        continue
                    cache = KVCache(c, B, T, device="meta", dtype=dtype)
                    rows.append({"model": preset, "dtype": str(dtype).replace("torch.", ""), "batch": B, "context": T,
                                 "bytes": cache.nbytes, "formula": per_token * B * T,
                                 "per_token_bytes": per_token, "match": cache.nbytes == per_token * B * T})
    return rows


def _sampler(samples, stop, period=0.02):
    t0 = time.perf_counter()
    while not stop.is_set():
        samples.append((time.perf_counter() - t0, rss_bytes()))
        time.sleep(period)


def long_run(model, tokenizer, n_requests, max_tokens, batch, prompt="ROMEO:\nWhat light"):
    """The real engine, n_requests streaming at once (up to `batch` running), each to max_tokens."""
    from pcgpt.serve.engine import DoneEvent, Engine, Request
    from pcgpt.model.sampling import SamplingParams
    engine = Engine("mem", model, tokenizer, metrics=None, max_batch_size=batch, max_queue=n_requests)
    engine.start()
    ids = tokenizer.encode(prompt)

    async def one(i):
        loop = asyncio.get_running_loop()
        r = Request(prompt_ids=ids, max_tokens=max_tokens, sampling=SamplingParams(temperature=1.0, seed=i),
                    stop_at_eos=False)
        r.loop, r.events = loop, asyncio.Queue()
        engine.submit([r])
        while True:
            ev = await r.events.get()
            if isinstance(ev, DoneEvent):
                return ev.completion_tokens

    async def main():
        return await asyncio.gather(*[one(i) for i in range(n_requests)])

    t0 = time.perf_counter()
    tokens = sum(asyncio.run(main()))
    wall = time.perf_counter() - t0
    engine.shutdown(1)
    return {"tokens": tokens, "wall_s": wall, "kv_cache_bytes": engine.cache.nbytes}


def touched_cache_growth(model, slots, length):
    """The physical check of the formula: a KV cache allocated and written grows RSS by its size."""
    before = rss_bytes()
    cache = model.new_cache(slots, length)
    cache.k.fill_(1.0)
    cache.v.fill_(1.0)
    return {"nbytes": cache.nbytes, "rss_growth": rss_bytes() - before,
            "formula": model.kv_bytes_per_token() * slots * length}


def child(gpt2_dir):
    from pcgpt.model.checkpoint import load_for_inference
    torch.set_grad_enabled(False)
    out = {"rss_after_import_torch": rss_bytes()}
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=_sampler, args=(samples, stop), daemon=True)
    sampler.start()
    marks = []

    peaks = []

    def mark(label):
        marks.append((time.perf_counter() - t_start, label))
        peaks.append((label, peak_rss_bytes()))  # the kernel's peak so far: catches spikes the sampler misses

    def exercise(name, model, tokenizer, slots, length, max_tokens):
        """A touched cache of slots × length, then `slots` streams of max_tokens each."""
        out[f"{name}_kv_{slots}x{length}"] = touched_cache_growth(model, slots, length)
        mark(f"{name}: long run ({slots} streams x {max_tokens} tokens)")
        out[f"{name}_long_run"] = long_run(model, tokenizer, n_requests=slots, max_tokens=max_tokens, batch=slots)
        out[f"rss_after_{name}_long_run"] = rss_bytes()
        mark(f"{name} long run done")

    t_start = time.perf_counter()
    char, char_tok, _ = load_for_inference(CHAR_CKPT)  # as `pcgpt serve` loads it
    out["rss_after_char_model"] = rss_bytes()
    mark("char model loaded")
    exercise("char", char, char_tok, 64, 256, 240)

    rss_before_gpt2 = rss_bytes()
    gpt2, gpt2_tok, _ = load_for_inference(gpt2_dir)
    out["gpt2_weight_bytes"] = sum(p.numel() * p.element_size() for p in gpt2.parameters())
    out["rss_after_gpt2_model"] = rss_bytes()
    mark("gpt2 loaded")
    exercise("gpt2", gpt2, gpt2_tok, 8, 1024, 96)
    stop.set()
    sampler.join()
    out["rss_before_gpt2_load"] = rss_before_gpt2
    out["peak_rss"] = peak_rss_bytes()
    out["rss_timeline"] = samples[::max(1, len(samples) // 600)]
    out["marks"] = marks
    out["peak_rss_at_marks"] = peaks
    json.dump(out, sys.stdout)


def run(quick=False):
    from tqdm import tqdm
    with tqdm(total=2, desc="4 memory", unit="part") as bar:
        result = {"formula": formula_table()}
        bar.update(1)
        import tempfile
        import transformers
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(d)
            proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", d], capture_output=True,
                                  text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed: {proc.stderr[-3000:]}")
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        bar.update(1)
    return result


if __name__ == "__main__":
    if "--child" in sys.argv:
        from bench.common import set_threads
        set_threads()
        child(sys.argv[sys.argv.index("--child") + 1])
