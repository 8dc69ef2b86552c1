"""3. HTTP: an asyncio + httpx load generator against a real `pcgpt serve` (loopback only, bounded
in count and time) with the shipped char baseline, next to the raw engine driven in-process with
the same request mix.

Closed loop: C clients, each sending its next streaming completion as soon as the previous one
ends, so C requests are always in flight. Per level: one warm-up request per client (not
counted), then `per_client` requests each (fewer if the level's time cap is reached). Measured
per request: TTFT (send to the first chunk with text), inter-token latency (gaps between chunks
with text, divided among the tokens a chunk carries), end-to-end latency; per level: aggregate
completion tokens/s over the level's wall time, and the CPU time used by the server and by the
load generator (so a saturated generator shows).

The raw engine: app.engine.Engine in this process, with the server's metrics object, its
max batch size and torch threads, fed the same requests by the same closed-loop clients through
asyncio queues (what the HTTP layer does, minus HTTP, JSON and SSE).
"""

import asyncio
import json
import os
import sys
import threading
import time

import torch
from tqdm import tqdm

from bench.common import CHAR_CKPT, ROOT, percentile, process_tree

CONCURRENCY = (1, 4, 16, 32, 64)
TARGET_LEVEL = 16  # the level of the HTTP/engine target: measured in TARGET_REPEATS interleaved pairs
TARGET_REPEATS = 3
STREAM_INTERVAL = 4  # a second server at the target level: `pcgpt serve --stream-interval 4`
PROMPTS = ["ROMEO:\nWhat light through yonder", "First Citizen:\nBefore we proceed", "KING HENRY:\nOnce more",
           "JULIET:\nO Romeo, Romeo", "HAMLET:\nTo be, or not", "LADY MACBETH:\nOut, damned",
           "DUKE:\nIf music be", "MENENIUS:\nWhy, masters"]
MAX_TOKENS = 64
TEMPERATURE = 1.0


def _thread_cpu_s(pid: int) -> dict:
    """CPU seconds per thread of a process and of its child processes (the server's engine
    processes): {tid: seconds}."""
    out = {}
    for p in process_tree(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _split_cpu(before, after, main_tid, engine_tid, tokens):
    """µs of CPU per generated token: the main thread (event loop) and the engine thread (the
    busiest other thread when not known)."""
    delta = {t: after[t] - before.get(t, 0.0) for t in after}
    loop = delta.get(main_tid, 0.0)
    others = {t: d for t, d in delta.items() if t != main_tid}
    if engine_tid is None and others:
        engine_tid = max(others, key=others.get)
    engine = others.get(engine_tid, 0.0)
    return {"loop_us_per_token": 1e6 * loop / max(tokens, 1), "engine_us_per_token": 1e6 * engine / max(tokens, 1)}


def _summary(records, wall, n_clients, cpu_server, cpu_client):
    ttft = [r["ttft"] for r in records]
    e2e = [r["e2e"] for r in records]
    itl = [x for r in records for x in r["itl"]]
    tokens = sum(r["tokens"] for r in records)
    out = {"concurrency": n_clients, "requests": len(records), "tokens": tokens, "wall_s": wall,
           "tok_s": tokens / wall if wall > 0 else float("nan"),
           "server_cpu_util": cpu_server / wall if cpu_server is not None else None,
           "client_cpu_util": cpu_client / wall}
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = 1000 * percentile(xs, q)
    out["chunks_per_token"] = sum(r["chunks"] for r in records) / max(tokens, 1)
    return out


async def _closed_loop(one, n_clients, per_client, time_cap):
    """Runs `one(client, i)` per client: a warm-up request, then per_client measured ones."""
    await asyncio.gather(*[one(c, -1) for c in range(n_clients)])
    records = []
    deadline = time.perf_counter() + time_cap
    t0 = time.perf_counter()

    async def client(c):
        for i in range(per_client):
            if time.perf_counter() > deadline:
                break
            records.append(await one(c, i))

    await asyncio.gather(*[client(c) for c in range(n_clients)])
    return records, time.perf_counter() - t0


def _body(c, i):
    return {"model": "shakespeare-char", "prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_tokens": MAX_TOKENS,
            "temperature": TEMPERATURE, "seed": 1000 * c + i + 1, "stream": True,
            "stream_options": {"include_usage": True}}


async def http_level(url, n_clients, per_client, time_cap, server_pid):
    import httpx
    limits = httpx.Limits(max_connections=n_clients + 8, max_keepalive_connections=n_clients + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(c, i):
            t0 = time.perf_counter()
            stamps, counts, tokens = [], [], None
            async with client.stream("POST", "/v1/completions", json=_body(c, i)) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
                    for ch in obj["choices"]:
                        if ch.get("text"):
                            stamps.append(time.perf_counter())
                            counts.append(len(ch["text"]))  # char model: one token per character
            return _record(t0, stamps, counts, tokens)

        cpu_c0, threads0 = time.process_time(), _thread_cpu_s(server_pid)
        records, wall = await _closed_loop(one, n_clients, per_client, time_cap)
        cpu_c1, threads1 = time.process_time(), _thread_cpu_s(server_pid)
    cpu_server = sum(threads1[t] - threads0.get(t, 0.0) for t in threads1)  # the server and its engine processes
    out = _summary(records, wall, n_clients, cpu_server, cpu_c1 - cpu_c0)
    out.update(_split_cpu(threads0, threads1, server_pid, None, out["tokens"]))
    return out


def _record(t0, stamps, counts, tokens):
    end = time.perf_counter()
    itl = []
    for k in range(1, len(stamps)):
        gap = stamps[k] - stamps[k - 1]
        itl += [gap / counts[k]] * counts[k]
    return {"ttft": (stamps[0] - t0) if stamps else end - t0, "e2e": end - t0, "itl": itl,
            "tokens": tokens if tokens is not None else sum(counts), "chunks": len(stamps)}


async def engine_level(engine, tokenizer, n_clients, per_client, time_cap):
    from pcgpt.serve.engine import DoneEvent, ErrorEvent, Request, TokenEvent
    from pcgpt.model.sampling import SamplingParams
    encoded = [tokenizer.encode(p) for p in PROMPTS]

    async def one(c, i):
        body = _body(c, i)
        loop = asyncio.get_running_loop()
        r = Request(prompt_ids=encoded[(c + i) % len(PROMPTS)], max_tokens=MAX_TOKENS,
                    sampling=SamplingParams(temperature=TEMPERATURE, seed=body["seed"]))
        r.loop, r.events = loop, asyncio.Queue()
        t0 = time.perf_counter()
        engine.submit([r])
        stamps, counts, tokens = [], [], None
        while True:
            ev = await r.events.get()
            if isinstance(ev, TokenEvent) and ev.text:
                stamps.append(time.perf_counter())
                counts.append(len(ev.text))  # char model: one token per character, as http_level counts
            elif isinstance(ev, DoneEvent):
                tokens = ev.completion_tokens
                break
            elif isinstance(ev, ErrorEvent):
                raise RuntimeError(ev.message)
        return _record(t0, stamps, counts, tokens)

    cpu0, threads0 = time.process_time(), _thread_cpu_s(os.getpid())
    records, wall = await _closed_loop(one, n_clients, per_client, time_cap)
    cpu1, threads1 = time.process_time(), _thread_cpu_s(os.getpid())
    out = _summary(records, wall, n_clients, None, cpu1 - cpu0)
    out.update(_split_cpu(threads0, threads1, threading.main_thread().native_id, engine._thread.native_id, out["tokens"]))
    return out


def run(quick=False, threads=1, tokens_per_level=8000, time_cap=40.0):
    """threads: torch threads of the server and of the raw engine (1 leaves the other core to the
    load generator, which runs on the same machine)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import Server
    from pcgpt.serve.engine import Engine
    from pcgpt.serve.metrics import Metrics
    from pcgpt.model.checkpoint import load_for_inference

    levels = (1, 4, 16) if quick else CONCURRENCY
    if quick:
        tokens_per_level, time_cap = 1500, 10.0
    max_batch = max(levels)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, tokenizer, _ = load_for_inference(CHAR_CKPT)  # as the server loads it
    engine = Engine("shakespeare-char", model, tokenizer, Metrics(), max_batch_size=max_batch, max_queue=4 * max_batch)
    engine.start()
    result = {"threads": threads, "max_batch_size": max_batch, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE,
              "tokens_per_level": tokens_per_level, "time_cap_s": time_cap, "rows": []}
    log_path = ROOT / "bench" / "results" / "http_server.log"

    def serve(*extra):  # the server every level talks to, with the raw engine's batch, queue and threads
        return Server({"shakespeare-char": CHAR_CKPT}, "--max-batch-size", str(max_batch), "--max-queue",
                      str(4 * max_batch), "--threads", str(threads), "--log-level", "warning", *extra,
                      log_path=log_path)

    try:
        with serve() as server:
            with tqdm(total=2 * len(levels), desc="3 http", unit="level") as bar:
                for c in levels:
                    per_client = max(2, -(-tokens_per_level // (MAX_TOKENS * c)))
                    bar.set_postfix_str(f"engine C={c}")
                    raw = asyncio.run(engine_level(engine, tokenizer, c, per_client, time_cap))
                    bar.update(1)
                    bar.set_postfix_str(f"http C={c}")
                    http = asyncio.run(http_level(server.url, c, per_client, time_cap, server.proc.pid))
                    bar.update(1)
                    row = {"concurrency": c, "per_client": per_client,
                           **{f"engine_{k}": v for k, v in raw.items() if k != "concurrency"},
                           **{f"http_{k}": v for k, v in http.items() if k != "concurrency"}}
                    row["http_over_engine"] = http["tok_s"] / raw["tok_s"]
                    if c == TARGET_LEVEL and not quick:
                        # one pair is noisy on a shared VM: more interleaved pairs, the median reported
                        ratios = [row["http_over_engine"]]
                        for _ in range(TARGET_REPEATS - 1):
                            raw_again = asyncio.run(engine_level(engine, tokenizer, c, per_client, time_cap))
                            http_again = asyncio.run(http_level(server.url, c, per_client, time_cap, server.proc.pid))
                            ratios.append(http_again["tok_s"] / raw_again["tok_s"])
                        row["http_over_engine_pairs"] = ratios
                        row["http_over_engine_median"] = sorted(ratios)[len(ratios) // 2]
                    result["rows"].append(row)
            result["server_steps_note"] = "engine batch-size histogram from /metrics"
            result["server_batch_size_sum"] = server.metric("pcgpt_batch_size_sum")
            result["server_batch_size_count"] = server.metric("pcgpt_batch_size_count")
        if not quick:  # the same target level with `--stream-interval 4`: fewer, larger chunks
            with serve("--stream-interval", str(STREAM_INTERVAL)) as server:
                c = TARGET_LEVEL
                per_client = max(2, -(-tokens_per_level // (MAX_TOKENS * c)))
                pairs, chunks = [], []
                for _ in tqdm(range(TARGET_REPEATS), desc=f"3 http, --stream-interval {STREAM_INTERVAL}", unit="pair"):
                    raw = asyncio.run(engine_level(engine, tokenizer, c, per_client, time_cap))
                    http = asyncio.run(http_level(server.url, c, per_client, time_cap, server.proc.pid))
                    pairs.append(http["tok_s"] / raw["tok_s"])
                    chunks.append(http["chunks_per_token"])
                result["stream_interval"] = {"interval": STREAM_INTERVAL, "concurrency": c, "pairs": pairs,
                                             "median": sorted(pairs)[len(pairs) // 2],
                                             "chunks_per_token": sorted(chunks)[len(chunks) // 2],
                                             "last_http": http}
    finally:
        engine.shutdown(2)
        torch.set_num_threads(saved_threads)
        if log_path.exists():
            log_path.unlink()
    single = {k: result["rows"][0][f"{k}_tok_s"] for k in ("engine", "http")}
    for row in result["rows"]:
        for k in ("engine", "http"):
            row[f"{k}_over_single"] = row[f"{k}_tok_s"] / single[k]
    return result
