"""torch.compile of the decode step on the CPU, against the eager step as served.

  python -m bench.compile_decode [--dtypes float32,bfloat16] [--batches 1,4,16]

GPT-2 124M shape (bench.llamacpp's random weights). Three ways to run one decode step
(model.generate.decode_step, window 256):
  eager        the served model: load_for_inference's weight formats (formats.py)
  compiled     torch.compile(step), inductor defaults, frozen weights (inductor's freezing)
  autotuned    mode="max-autotune": inductor also times its own C++ GEMM templates against
               oneDNN / MKL per matmul shape and keeps the fastest
  autotuned-dynamic  the same with dynamic=True: one graph for every batch size and window, as a
               server with continuous batching would need (the others compile per shape)
The compiled ones start from the plain nn.Linear model (inductor packs weights itself). Each is
compiled for each batch size first (the seconds this takes are reported), then the ways are timed
interleaved: median ms per step over --steps steps, --repeats times.
Writes bench/results/compile_decode.json.
"""

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import RESULTS, machine, set_threads

WINDOW = 256


def load(dtype, served: bool):
    from bench.llamacpp import hf_dir
    from pcgpt.model.checkpoint import load_checkpoint, load_for_inference
    if served:
        return load_for_inference(hf_dir(), dtype=dtype)[0]
    model = load_checkpoint(hf_dir(), dtype=dtype)[0]
    return model.requires_grad_(False).eval()


def make_step(model, how: str):
    from pcgpt.model.generate import decode_step

    def step(tokens, pos, cache):
        return decode_step(model, tokens, pos, cache, kv_len=WINDOW)[0]
    if how == "eager":
        return step
    return torch.compile(step, mode="max-autotune" if how.startswith("autotuned") else None,
                         dynamic=how.endswith("dynamic"))


@torch.no_grad()
def time_steps(step, cache, batch: int, steps: int, served: bool) -> float:
    """The served step runs in inference_kernels as the engine runs it; compiled ones as they are
    (inductor picks their kernels)."""
    from pcgpt.model.formats import inference_kernels
    tokens = torch.randint(0, 50257, (batch,), generator=torch.Generator().manual_seed(batch))
    pos = torch.full((batch,), 16, dtype=torch.long)
    times = []
    with inference_kernels(cache.k_layers[0]) if served else contextlib.nullcontext():
        for _ in range(steps):
            t = time.perf_counter()
            step(tokens, pos, cache)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--ways", default="eager,compiled,autotuned")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "compile_decode.json"))
    args = p.parse_args(argv)
    import torch._inductor.config as inductor
    inductor.freezing = True  # weights become constants inductor can prepack
    # one compiled graph per (way, dtype, batch) of the same step function: past dynamo's default
    # limit it would silently run the rest eagerly
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 256
    threads = set_threads()
    batches = [int(b) for b in args.batches.split(",")]
    ways = args.ways.split(",")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        models = {"eager": load(dtype, served=True)}
        plain = load(dtype, served=False) if any(w != "eager" for w in ways) else None
        steps, caches, compile_s = {}, {}, {}
        for way in ways:
            model = models["eager"] if way == "eager" else plain
            for b in batches:
                caches[way, b] = model.new_cache(b, max_len=WINDOW)
                steps[way, b] = make_step(model, way)
                t = time.perf_counter()
                time_steps(steps[way, b], caches[way, b], b, 2, way == "eager")  # compiles on its first call
                compile_s[way, b] = time.perf_counter() - t
                print(f"{dtype_name} {way} batch {b}: first call {compile_s[way, b]:.1f} s", flush=True)
        ms = {key: [] for key in steps}
        for _ in range(args.repeats):
            for b in batches:
                for way in ways:
                    ms[way, b].append(time_steps(steps[way, b], caches[way, b], b, args.steps, way == "eager"))
        for (way, b), xs in ms.items():
            rows.append({"dtype": dtype_name, "way": way, "batch": b, "first_call_s": compile_s[way, b],
                         "ms_per_step": statistics.median(xs), "ms_all": xs,
                         "tok_s": 1e3 * b / statistics.median(xs)})
        del models, plain, steps, caches
    result = {"machine": machine(), "threads": threads, "window": WINDOW, "torch": torch.__version__,
              "command": "python -m bench.compile_decode", "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| dtype | batch | " + " | ".join(f"{w} tok/s [ms range]" for w in ways) + " | first call, s |")
    for dtype_name in args.dtypes.split(","):
        for b in batches:
            cells = []
            for w in ways:
                r = next(r for r in rows if r["dtype"] == dtype_name and r["way"] == w and r["batch"] == b)
                cells.append(f"{r['tok_s']:.1f} [{min(r['ms_all']):.1f}–{max(r['ms_all']):.1f}]")
            first = "/".join(f"{next(r for r in rows if r['dtype'] == dtype_name and r['way'] == w and r['batch'] == b)['first_call_s']:.0f}"
                             for w in ways)
            print(f"| {dtype_name} | {b} | " + " | ".join(cells) + f" | {first} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
