"""pcgpt on a CUDA GPU, in one run of at most ~8 minutes: `python -m bench.gpu` (on a machine with
a GPU; without one it exits 2 at once). Writes bench/results/gpu.json (and gpu_profile.txt).

1. tests: tests/test_cuda.py (CUDA fp32 greedy == CPU fp32 greedy for the shipped char models;
   CUDA-graph decode == eager decode; PC settling beside the graphs; train and eval on CUDA).
2. decode: GPT-2 124M shape (random weights, saved by HF as bench/models.py does), bf16, greedy,
   prompt 16, 128 new tokens, batch 1, 8, 32, 128: ours (the serving engine, in process) with and
   without CUDA graphs, HF transformers `generate` (eager, sdpa), and HF with its static cache and
   torch.compile where it runs; methods interleaved per repeat, medians. Steady decode tokens/s =
   B·(N−1) / (time from every row's first token to the last token).
3. bound: the launch-free bound of each batch size: the captured step replayed back to back (CUDA
   events, no Python between replays); and the graphs' capture time (the start-up cost).
4. pc: the shipped PC char model (and its baseline), batch 16, settle steps 0, 1, 2, 4.
5. profile: torch.profiler over decode steps at batch 1, with and without graphs (the top ops).
6. http: a real `pcgpt serve --device cuda` with GPT-2 and both char models; 1 / 16 / 64 streaming
   clients: tokens/s, TTFT p50/p99, the server's CPU seconds per token, and the fraction of the
   in-process engine's tokens/s at the same concurrency; and its greedy text equals
   model/generate.generate's on the same device.
Each section's failure is recorded in the JSON and the next section still runs.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROMPT_LEN = 16
# the run's settings; --smoke shrinks them so the whole script's plumbing runs on a CPU in a minute
CFG = {"device": "cuda", "dtype": "bfloat16", "batches": (1, 8, 32, 128), "new_tokens": 128, "gpt2": {}, "http_levels": (1, 16, 64),
       "http_seconds": 12.0, "pc_batch": 16}
SMOKE = {"device": "cpu", "dtype": "float32", "batches": (1, 2), "new_tokens": 8, "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2},
         "http_levels": (1, 2), "http_seconds": 2.0, "pc_batch": 2}


def sync():
    import torch
    if CFG["device"] == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the decode benchmark")
    parser.add_argument("--only", default="tests,decode,pc,profile,http",
                        help="comma-separated sections (tests, decode, pc, profile, http)")
    parser.add_argument("--out", default=str(RESULTS / "gpu.json"))
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run on the CPU (small GPT-2 shape, batches 1 and 2, no graphs): checks the "
                             "script itself, measures nothing; writes to --out (default: a temporary file)")
    args = parser.parse_args(argv)
    import torch
    if args.smoke:
        CFG.update(SMOKE)
        if args.out == str(RESULTS / "gpu.json"):
            args.out = os.path.join(tempfile.mkdtemp(), "gpu-smoke.json")
    elif not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine",
              file=sys.stderr)
        return 2
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - {"tests", "decode", "pc", "profile", "http"}
    if unknown:
        print(f"bench/gpu.py: error: --only: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name() if CFG["device"] == "cuda" else "cpu (smoke run)", "torch": torch.__version__, "cuda": torch.version.cuda,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runners = {"tests": run_tests if not args.smoke else lambda: {"skipped": "smoke run"}, "decode": lambda: run_decode(args.repeats), "pc": run_pc,
               "profile": run_profile, "http": run_http}
    for name in sections:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result["sections"][name] = runners[name]()
        except Exception:
            result["sections"][name] = {"error": traceback.format_exc()}
            print(result["sections"][name]["error"], file=sys.stderr, flush=True)
        result["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(result, indent=1, default=str))  # what is done so far survives a timeout
    print(json.dumps(summary(result), indent=1, default=str))
    return 0


# --- 1. the CUDA tests ------------------------------------------------------------------------------

def run_tests() -> dict:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    return {"returncode": p.returncode, "tail": (p.stdout + p.stderr)[-3000:]}


# --- 2./3. decode --------------------------------------------------------------------------------------

def gpt2_pair(dtype):
    import torch
    import transformers
    from pcgpt.model.checkpoint import load_for_inference
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CFG["gpt2"])).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, tokenizer, _ = load_for_inference(d, device=CFG["device"], dtype=dtype)
    hf = hf.to(CFG["device"], dtype).requires_grad_(False)
    return ours, hf, tokenizer


def make_engine(model, tokenizer, batch: int, cuda_graphs: bool, deliver):
    from pcgpt.serve.engine import Engine
    engine = Engine("bench", model, tokenizer, None, max_batch_size=batch, max_queue=batch, deliver=deliver,
                    cuda_graphs=cuda_graphs)
    engine._thread = type("Alive", (), {"is_alive": staticmethod(lambda: True)})()  # stepped here, no thread
    return engine


class Collector:
    """The engine's deliver callable: counts finished requests and their tokens."""

    def __init__(self):
        self.done = self.tokens = 0

    def __call__(self, items):
        from pcgpt.serve.engine import DoneEvent, ErrorEvent
        for r, event in items:
            if isinstance(event, DoneEvent):
                self.done += 1
                self.tokens += event.completion_tokens
            elif isinstance(event, ErrorEvent):
                raise RuntimeError(event.message)


def engine_run(engine, collector, prompts, n_new: int, settle=None) -> dict:
    """B greedy requests of n_new tokens each through the engine, stepped here. Steady decode
    tokens/s: B rows per decode step, from the first step after the last admission to the end."""
    import torch
    from pcgpt.model.sampling import SamplingParams
    from pcgpt.serve.engine import Request
    B = len(prompts)
    collector.done = collector.tokens = 0
    requests = [Request(prompt_ids=p, max_tokens=n_new, sampling=SamplingParams(temperature=0.0), settle_steps=settle,
                        stop_at_eos=False, index=i) for i, p in enumerate(prompts)]
    sync()
    t0 = time.perf_counter()
    engine.submit(requests)
    t_first = steps_first = None
    while collector.done < B:
        engine.step()
        if t_first is None and not engine.waiting:  # every row admitted and holding its first tokens
            t_first, steps_first = time.perf_counter(), engine.steps_run
    t_end = time.perf_counter()  # each step ends with its device-to-host copy: nothing is left in flight
    return {"decode_tok_s": B * (engine.steps_run - steps_first) / (t_end - t_first),
            "e2e_tok_s": collector.tokens / (t_end - t0), "tokens": collector.tokens}


def hf_run(hf, prompts, n_new: int, static_compiled: bool = False) -> dict:
    import torch
    from bench.decode import _Stamps
    streamer = _Stamps()
    kwargs = dict(cache_implementation="static") if static_compiled else {}
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, use_cache=True, streamer=streamer, pad_token_id=0, **kwargs)
    sync()
    t_end = time.perf_counter()
    B, n = prompts.shape[0], out.shape[1] - prompts.shape[1]
    t_first = streamer.t[1]  # put() gets the prompt first, then each new token
    return {"decode_tok_s": B * (n - 1) / (t_end - t_first), "e2e_tok_s": B * n / (t_end - t0), "tokens": B * n}


def launch_free_bound(engine, batch: int, replays: int = 50) -> dict:
    import torch
    graph, _ = engine.runner.graphs.graphs[batch]
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    step_s = start.elapsed_time(end) / 1000 / replays
    return {"step_us": step_s * 1e6, "tok_s": batch / step_s}


def run_decode(repeats: int) -> dict:
    import torch
    from bench.common import median
    ours, hf, tokenizer = gpt2_pair(getattr(torch, CFG['dtype']))
    vocab = tokenizer.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows, engines, capture_s = [], {}, {}
    for B in CFG['batches']:
        for graphs in (True, False):
            collector = Collector()
            t0 = time.perf_counter()
            engines[B, graphs] = (make_engine(ours, tokenizer, B, graphs, collector), collector)
            sync()
            if graphs:
                capture_s[B] = time.perf_counter() - t0
    compiled_hf = None
    try:  # HF's static cache with its forward compiled (reduce-overhead: CUDA graphs), if this transformers has it
        import copy
        compiled_hf = copy.deepcopy(hf)
        compiled_hf.forward = torch.compile(compiled_hf.forward, mode="reduce-overhead", fullgraph=True)
    except Exception as e:
        compiled_hf = None
        compile_error = f"{type(e).__name__}: {e}"
    else:
        compile_error = None
    methods = ["ours_graphs", "ours_eager", "hf", "hf_static_compile"]
    samples = {(B, m): [] for B in CFG['batches'] for m in methods}
    errors = {}
    for rep in range(repeats + 1):  # the first round warms up (and compiles): not counted
        for B in CFG['batches']:
            prompts = torch.randint(0, vocab, (B, PROMPT_LEN), generator=gen)
            for m in methods:
                if (B, m) in errors:
                    continue
                try:
                    if m.startswith("ours"):
                        engine, collector = engines[B, m == "ours_graphs"]
                        r = engine_run(engine, collector, [p.tolist() for p in prompts], CFG['new_tokens'])
                    elif m == "hf":
                        r = hf_run(hf, prompts.to(CFG["device"]), CFG['new_tokens'])
                    else:
                        if compiled_hf is None or B > 8 or CFG["device"] != "cuda":  # compiling per batch size costs minutes: 1 and 8 only
                            raise RuntimeError(compile_error or "not run above batch 8 (compile time)")
                        r = hf_run(compiled_hf, prompts.to(CFG["device"]), CFG['new_tokens'], static_compiled=True)
                except Exception as e:
                    errors[B, m] = f"{type(e).__name__}: {str(e)[:300]}"
                    continue
                if rep > 0:
                    samples[B, m].append(r["decode_tok_s"])
    for B in CFG['batches']:
        row = {"batch": B}
        for m in methods:
            xs = samples[B, m]
            row[m] = {"median": median(xs), "min": min(xs), "max": max(xs)} if xs else {"error": errors.get((B, m))}
        graphed = engines[B, True][0].runner.graphs is not None
        row["bound"] = launch_free_bound(engines[B, True][0], B) if graphed else None
        row["capture_s"] = capture_s[B] if graphed else None
        g, h = row["ours_graphs"].get("median"), row["hf"].get("median")
        row["graphs_over_hf"] = g / h if g and h else None
        row["graphs_over_bound"] = g / row["bound"]["tok_s"] if g and graphed else None
        rows.append(row)
    return {"model": f"GPT-2 124M shape{CFG['gpt2'] or ''}, random weights, {CFG['dtype']}", "prompt": PROMPT_LEN, "new_tokens": CFG['new_tokens'],
            "repeats": repeats, "rows": rows,
            "targets": {"batch1_over_hf>=8": rows[0]["graphs_over_hf"],
                        "batch128_over_hf>=3": rows[-1]["graphs_over_hf"],
                        "batch1_within_2x_of_bound": rows[0]["graphs_over_bound"]}}


# --- 4. PC on the GPU ---------------------------------------------------------------------------------

def run_pc() -> dict:
    batch, n_new = CFG["pc_batch"], CFG["new_tokens"]
    from bench.common import CHAR_CKPT, CHAR_PC_CKPT, median
    from pcgpt.model.checkpoint import load_for_inference
    out = {"batch": batch, "new_tokens": n_new, "rows": []}
    for name, path, settles in (("baseline", CHAR_CKPT, [None]), ("pc", CHAR_PC_CKPT, [0, 1, 2, 4])):
        model, tokenizer, _ = load_for_inference(path, device=CFG["device"])  # bf16 where the GPU has it
        prompts = [tokenizer.encode("ROMEO:\n" + "ab"[i % 2]) for i in range(batch)]
        for graphs in (True, False):
            collector = Collector()
            engine = make_engine(model, tokenizer, batch, graphs, collector)
            for settle in settles:
                xs = [engine_run(engine, collector, prompts, n_new, settle)["decode_tok_s"] for _ in range(4)][1:]
                out["rows"].append({"model": name, "settle_steps": settle, "cuda_graphs": graphs,
                                    "tok_s": median(xs), "min": min(xs), "max": max(xs)})
    t0 = {r["cuda_graphs"]: r["tok_s"] for r in out["rows"] if r["model"] == "pc" and r["settle_steps"] == 0}
    for r in out["rows"]:
        if r["model"] == "pc":
            r["step_cost_vs_t0"] = t0[r["cuda_graphs"]] / r["tok_s"]
    return out


# --- 5. profile ------------------------------------------------------------------------------------------

def run_profile(steps: int = 30) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    ours, _, tokenizer = gpt2_pair(getattr(torch, CFG['dtype']))
    lines, out = [], {}
    for graphs in (True, False):
        collector = Collector()
        engine = make_engine(ours, tokenizer, 1, graphs, collector)
        prompt = [list(range(PROMPT_LEN))]
        engine_run(engine, collector, prompt, 16)  # warm
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CFG["device"] == "cuda" else [])
        with profile(activities=activities) as prof:
            r = engine_run(engine, collector, prompt, steps)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        lines += [f"==== batch 1, {steps} new tokens, cuda_graphs={graphs}: {r['decode_tok_s']:.0f} tok/s", table]
        events = prof.key_averages()
        out[f"graphs={graphs}"] = {"tok_s": r["decode_tok_s"],
                                   "cpu_ms_per_token": sum(e.self_cpu_time_total for e in events) / 1000 / steps,
                                   "cuda_ms_per_token": sum(getattr(e, "self_device_time_total", 0) for e in events)
                                   / 1000 / steps,
                                   "kernel_launches_per_token": sum(e.count for e in events
                                                                    if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                                 "cudaGraphLaunch")) / steps}
    if CFG["device"] == "cuda":  # a smoke run's profile is not worth a file
        (RESULTS / "gpu_profile.txt").write_text("\n".join(lines))
    return out


# --- 6. HTTP ---------------------------------------------------------------------------------------------

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http() -> dict:
    levels, seconds = CFG["http_levels"], CFG["http_seconds"]
    import httpx
    import torch
    from bench.common import CHAR_CKPT, CHAR_PC_CKPT, percentile
    from bench.http_load import _thread_cpu_s
    import transformers
    from pcgpt.model.checkpoint import load_for_inference
    from pcgpt.model.generate import generate
    from pcgpt.model.sampling import SamplingParams
    result = {"levels": [], "max_tokens": 64}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**CFG["gpt2"])).save_pretrained(d)
        port = free_port()
        log_path = Path(tempfile.mkdtemp()) / "gpu_server.log"
        log = open(log_path, "w")
        argv = [sys.executable, "-m", "pcgpt.cli", "serve", "--device", CFG["device"], "--port", str(port),
                "--max-batch-size", "64", "--max-queue", "256", "--log-level", "warning",
                "--model", f"gpt2={d}", "--model", f"shakespeare-char={CHAR_CKPT}",
                "--model", f"shakespeare-char-pc={CHAR_PC_CKPT}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"pcgpt serve exited {proc.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > 180:
                    raise RuntimeError("pcgpt serve not ready after 180 s")
                time.sleep(0.5)
            result["start_s"] = time.perf_counter() - t0
            # greedy text through the server == generate() on the same device and dtype
            checks = {}
            for name, path in (("shakespeare-char", CHAR_CKPT), ("shakespeare-char-pc", CHAR_PC_CKPT)):
                model, tokenizer, _ = load_for_inference(path, device=CFG["device"])
                prompt = "ROMEO:\nWhat light"
                want = tokenizer.decode([t for t, _, _ in generate(model, tokenizer.encode(prompt), 100,
                                                                    SamplingParams(temperature=0))])
                got = httpx.post(url + "/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 100,
                                                                 "temperature": 0}, timeout=60).json()
                checks[name] = got["choices"][0]["text"] == want
            result["greedy_server_equals_generate"] = checks
            for model_name in ("gpt2", "shakespeare-char"):
                for c in levels:
                    before = _thread_cpu_s(proc.pid)
                    records, wall = asyncio.run(stream_load(url, model_name, c, seconds))
                    after = _thread_cpu_s(proc.pid)
                    tokens = sum(r["tokens"] for r in records)
                    ttft = [r["ttft"] for r in records]
                    server_cpu = sum(after[t] - before.get(t, 0.0) for t in after)
                    result["levels"].append({"model": model_name, "clients": c, "requests": len(records),
                                             "tok_s": tokens / wall, "ttft_p50_ms": percentile(ttft, 50) * 1000,
                                             "ttft_p99_ms": percentile(ttft, 99) * 1000,
                                             "server_main_cpu_s_per_1k_tokens": 1000 * server_cpu / max(tokens, 1)})
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    # the raw engine at the same concurrency (in process, no HTTP): what the server could deliver
    result["engine"] = engine_levels(levels)
    for row in result["levels"]:
        raw = result["engine"].get(f"{row['model']}@{row['clients']}")
        row["fraction_of_engine"] = row["tok_s"] / raw if raw else None
    return result


async def stream_load(url, model, clients: int, seconds: float):
    import httpx
    deadline = time.perf_counter() + seconds
    records = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def one_client(c):
            i = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                first, tokens = None, 0
                body = {"model": model, "prompt": "ROMEO:\nWhat light", "max_tokens": 64, "temperature": 1.0,
                        "seed": 1000 * c + i, "stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        obj = json.loads(line[6:])
                        if obj.get("usage"):
                            tokens = obj["usage"]["completion_tokens"]
                        elif first is None and any(ch.get("text") for ch in obj["choices"]):
                            first = time.perf_counter()
                records.append({"ttft": (first or time.perf_counter()) - t0, "tokens": tokens})
                i += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        return records, time.perf_counter() - t0


def engine_levels(levels) -> dict:
    """Tokens/s of the in-process engine (CUDA graphs on, as the server runs) at each concurrency:
    every client one request of 64 tokens at a time, as the HTTP load, without HTTP."""
    import torch
    from bench.common import CHAR_CKPT
    from pcgpt.model.checkpoint import load_for_inference
    out = {}
    gpt2, _, gpt2_tok = gpt2_pair(getattr(torch, CFG['dtype']))
    char, char_tok, _ = load_for_inference(CHAR_CKPT, device=CFG["device"])
    for name, model, tokenizer in (("gpt2", gpt2, gpt2_tok), ("shakespeare-char", char, char_tok)):
        collector = Collector()
        engine = make_engine(model, tokenizer, max(levels), True, collector)
        prompt = tokenizer.encode("ROMEO:\nWhat light")
        for c in levels:
            engine_run(engine, collector, [prompt] * c, 64)  # warm
            r = [engine_run(engine, collector, [prompt] * c, 64)["e2e_tok_s"] for _ in range(3)]
            out[f"{name}@{c}"] = sorted(r)[1]
    return out


def summary(result: dict) -> dict:
    s = {"device": result["device"]}
    for name, sec in result["sections"].items():
        s[name] = {"seconds": sec.get("seconds"), "error": (sec.get("error") or "")[-300:] or None}
    decode = result["sections"].get("decode", {})
    if "targets" in decode:
        s["targets"] = decode["targets"]
    return s


if __name__ == "__main__":
    sys.exit(main())
