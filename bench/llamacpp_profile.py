"""Where a decode step's time goes, pcgpt beside llama.cpp, on the same GPT-2 124M-shape weights.

  python -m bench.llamacpp_profile [--pairs f32:fp32:1,f32:fp32:16,...]

For each pair (llama.cpp type, pcgpt format, batch):
- llama.cpp: `perf record` (cpu-clock samples, every thread) over llama-batched-bench's run, then
  the samples grouped by function: the matmul kernels (ggml's vec_dot / gemv / gemm and mul_mat),
  the threads' barrier and spin waits, attention, the rest.
- pcgpt: torch.profiler over decode steps as bench.llamacpp runs them, the self time grouped the
  same way: the Linear kernels, attention, the rest (layer norms, GELU, cache writes, ...), and the
  Python between them (wall time the ops do not account for).
Each side's weight bytes per token over its time per step gives the rate it streams its weights.
Needs bench.llamacpp's build and GGUF files (`make bench-llamacpp` makes them) and Linux perf
(`make bench-llamacpp` installs it); writes bench/results/llamacpp_profile.json and prints a table.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import RESULTS, machine, set_threads
from bench.llamacpp import gguf, load_ours, log, tool

# function-name fragments -> group, first match wins
LLAMA_GROUPS = (
    ("barrier / spin", ("ggml_barrier", "sched_yield", "ggml_graph_compute_thread_sync", "__sched", "futex",
                        "ggml_graph_compute_check_for_work", "pthread", "nanosleep")),
    ("matmul", ("vec_dot", "gemv", "gemm", "mul_mat", "ggml_compute_forward_get_rows_q", "quantize_row",
                "from_float")),
    ("attention", ("soft_max", "flash_attn", "rope")),
)
TORCH_GROUPS = (
    ("matmul", ("linear", "addmm", "aten::mm", "matmul", "int8pack", "int4pack", "_int_mm", "quantized::")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
)


def group_of(name: str, groups) -> str:
    lowered = name.lower()
    for group, fragments in groups:
        if any(f in lowered for f in fragments):
            return group
    return "other"


def profile_llamacpp(kind: str, batch: int, threads: int, prompt: int, new: int) -> dict:
    """perf samples of llama-batched-bench at one batch size, by group and top functions."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        cmd = [str(tool("llama-batched-bench")), "-m", str(gguf(kind)), "-c", str(batch * (prompt + new) + 64),
               "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(new), "-npl", str(batch),
               "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
        run = subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", "1999", "-q", "-o", str(data), "--", *cmd],
                             capture_output=True, text=True, check=True)
        speed = next(float(json.loads(line)["speed_tg"]) for line in run.stdout.splitlines() if line.startswith("{"))
        report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "sym", "--percent-limit",
                                 "0.2", "-q"], capture_output=True, text=True, check=True).stdout
    by_group, top = defaultdict(float), []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        share, name = float(parts[0][:-1]), " ".join(parts[2:])
        by_group[group_of(name, LLAMA_GROUPS)] += share
        top.append((name, share))
    # the prompt's prefill is in the samples too; it is short next to `new` decode steps
    return {"tok_s": speed, "step_ms": 1e3 * batch / speed, "percent": dict(by_group), "top": top[:8]}


@torch.no_grad()
def profile_pcgpt(model, batch: int, prompt: int, steps: int) -> dict:
    """torch.profiler self time by group over `steps` decode steps at one batch size."""
    from pcgpt.model.formats import inference_kernels
    from pcgpt.model.generate import decode_step, kv_len_bucket, prefill_batch
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    cache = model.new_cache(batch, max_len=prompt + 2 * steps + 2)
    with inference_kernels(model.lm_head.weight):
        logits, _ = prefill_batch(model, list(prompts), cache, torch.arange(batch))
        token, pos = logits.argmax(-1), torch.full((batch,), prompt, dtype=torch.long)

        def run(n):
            nonlocal token
            for _ in range(n):
                logits, _ = decode_step(model, token, pos, cache, kv_len=kv_len_bucket(int(pos.max()) + 1, cache.max_len))
                token = logits.argmax(-1)
                pos.add_(1)

        run(steps // 4)  # warm-up
        t = time.perf_counter()
        run(steps // 2)
        step_ms = 1e3 * (time.perf_counter() - t) / (steps // 2)
        with torch.profiler.profile() as prof:
            t = time.perf_counter()
            run(steps // 2)
            wall_us = 1e6 * (time.perf_counter() - t)
    by_group, top = defaultdict(float), []
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total):
        by_group[group_of(e.key, TORCH_GROUPS)] += e.self_cpu_time_total
        top.append((e.key, round(100 * e.self_cpu_time_total / wall_us, 1)))
    ops = sum(by_group.values())
    percent = {g: 100 * us / wall_us for g, us in by_group.items()}
    percent["python and dispatch"] = max(0.0, 100 * (wall_us - ops) / wall_us)
    return {"tok_s": 1e3 * batch / step_ms, "step_ms": step_ms, "percent": percent, "top": top[:8]}


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every matrix once (quantized ones by their parts);
    the embedding's few rows are left out."""
    from pcgpt.model.quantize import tensor_bytes
    return sum(tensor_bytes(m.weight.data) for m in model.modules() if isinstance(m, torch.nn.Linear))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="f32:fp32:1,f32:fp32:16,f16:bf16:1,f16:bf16:16,q8_0:int8-dynamic:1,"
                                      "q4_0:int4:1",
                   help="llama.cpp type:pcgpt format:batch, comma-separated")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS / "llamacpp_profile.json"))
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("llamacpp_profile: Linux perf is missing (make bench-llamacpp installs it)")
    set_threads(args.threads)
    pairs = [(k, f, int(b)) for k, f, b in (s.split(":") for s in args.pairs.split(","))]
    models, rows = {}, []
    for kind, fmt, batch in pairs:
        if fmt not in models:
            models[fmt] = load_ours(fmt)
        ggml_bytes = gguf(kind).stat().st_size
        llama = profile_llamacpp(kind, batch, args.threads, args.prompt, args.new_tokens)
        # int4 is ~20x slower per step: fewer steps keep the run short
        ours = profile_pcgpt(models[fmt], batch, args.prompt, 16 if fmt == "int4" else args.new_tokens)
        ours_bytes = weight_bytes_per_step(models[fmt])
        row = {"llama_cpp_type": kind, "pcgpt_format": fmt, "batch": batch, "llama_cpp": llama, "pcgpt": ours,
               "llama_cpp_file_bytes": ggml_bytes, "pcgpt_weight_bytes_per_step": ours_bytes,
               "llama_cpp_gb_s": ggml_bytes / llama["step_ms"] / 1e6, "pcgpt_gb_s": ours_bytes / ours["step_ms"] / 1e6}
        rows.append(row)
        log(f"{kind} vs {fmt}, batch {batch}: llama.cpp {llama['step_ms']:.1f} ms/step {llama['percent']}, "
            f"pcgpt {ours['step_ms']:.1f} ms/step {ours['percent']}")
    result = {"machine": machine(), "threads": args.threads, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "command": "python -m bench.llamacpp_profile", "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    groups = ("matmul", "attention", "barrier / spin", "python and dispatch", "other")
    print("| pair | batch | ms/step | GB/s of weights | " + " | ".join(groups) + " |")
    for r in rows:
        for side, name in (("llama_cpp", f"llama.cpp {r['llama_cpp_type']}"), ("pcgpt", f"pcgpt {r['pcgpt_format']}")):
            d = r[side]
            cells = [f"{d['percent'].get(g, 0):.0f}%" for g in groups]
            print(f"| {name} | {r['batch']} | {d['step_ms']:.1f} | {r[side + '_gb_s']:.1f} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
