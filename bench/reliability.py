"""Reliability runs against real `pcgpt serve` processes on loopback: overload, disconnects, soak,
faults. Every run is bounded in requests and in time and stops by itself.

  .venv/bin/python -m bench.reliability --all                    # every run at its default size
  .venv/bin/python -m bench.reliability --overload 512 --waves 3    # each run alone
  .venv/bin/python -m bench.reliability --disconnects 120
  .venv/bin/python -m bench.reliability --soak 3000
  .venv/bin/python -m bench.reliability --faults

  overload     waves of N concurrent requests (far more than --max-batch-size 4 + --max-queue 8 hold),
               half streamed, all greedy: the excess gets 429 at once, every accepted request completes
               with the reference text (the same prompt sent alone beforehand), no request hangs, the
               server's RSS after the last wave is within RSS_RETURN_MB of its level after the first.
  disconnects  N long streams (and some non-streamed requests) cut by the client at random points:
               after k chunks, after a random delay (some while still queued), or by a client timeout.
               Running and waiting counts and pcgpt_kv_cache_usage_ratio return to 0, the server logs
               no ERROR and no traceback, and a request afterwards gets the reference text.
  soak         N short requests of every kind (completions / chat, streamed or not, n, logprobs, echo,
               stop), 6 at a time: every one answered 200 and well formed; RSS sampled throughout.
               Reported: RSS growth after the warm-up (the first 20 %) and latency drift (median of
               the last tenth over the first tenth after warm-up). RSS growth over LEAK_MB fails.
  faults       a checkpoint that is truncated, has wrong tensor shapes, or holds a pickle that would
               run code (nanoGPT ckpt.pt, meta.pkl beside it, HF pytorch_model.bin) makes `pcgpt serve`
               exit non-zero at start with a message naming the file, no traceback, no code run.
               With PCGPT_FAULT_INJECTION=1 (test-only hook, app/server.py): a request with user
               "fault:request" fails inside its row's step (500 in OpenAI's error shape, or an in-band
               `data: {"error": ...}` event for a stream) while the requests batched with it finish
               with their reference text and the engine keeps running; "fault:engine" kills the
               engine loop: the requests in it fail, /ready answers 503 naming the dead engine, new
               requests get 503.

Each run returns a dict of figures with a "problems" list (empty: passed). tests/test_reliability.py
calls the same functions with small sizes; RELIABILITY.md has the figures of full runs. The results
of a command-line run go to bench/results/reliability.json.
"""

import argparse
import asyncio
import json
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import process_tree  # noqa: E402
from tests.serving import PCGPT, Server, free_port, snapshot_baseline  # noqa: E402

MODEL = "shakespeare-char"
BATCH, QUEUE = 4, 8  # the server the load runs use: 4 KV-cache slots, 8 queue places
RSS_RETURN_MB = 64.0  # overload: RSS after the last wave may exceed RSS after the first by this much
LEAK_MB = 16.0  # soak: RSS growth after warm-up over this fails the run (observed: ±0.5 MB)
PROMPTS = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "KING RICHARD III:\n", "To be, or not to be",
           "O, ", "What light through yonder", "MENENIUS:\nI tell you"]
SERVER_ARGS = ("--max-batch-size", str(BATCH), "--max-queue", str(QUEUE), "--drain-seconds", "5")


# --- helpers ------------------------------------------------------------------------------------

# the fault run looks at a dead engine: its restart (after --engine-restart-backoff) is kept far off
FAULTS_SERVER_ARGS = ("--engine-restart-backoff", "600")


@contextmanager
def serve(ckpt: Path, log_path: Path, fault_injection: bool = False, *extra: str):
    env = {"PCGPT_FAULT_INJECTION": "1"} if fault_injection else {"PCGPT_FAULT_INJECTION": "0"}
    with Server({MODEL: ckpt}, *SERVER_ARGS, *extra, env=env, log_path=log_path) as s:
        yield s


def rss_mb(pid: int) -> float:
    """Resident memory of the server and its engine processes."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            if p == pid:
                raise
    return total / 1024


def gauges(server: Server) -> dict:
    labels = {"model": MODEL}
    return {"running": server.metric("pcgpt_num_requests_running", labels),
            "waiting": server.metric("pcgpt_num_requests_waiting", labels),
            "kv_usage": server.metric("pcgpt_kv_cache_usage_ratio", labels)}


def _run_bounded(main, what: str, timeout: float, problems: list) -> float:
    """asyncio.run(main()), whose own wait_for bounds it; a timeout becomes a problem. Returns seconds."""
    t0 = time.perf_counter()
    try:
        asyncio.run(main())
    except asyncio.TimeoutError:
        problems.append(f"{what} did not finish within {timeout} s")
    return time.perf_counter() - t0


def wait_idle(server: Server, timeout: float = 15.0) -> tuple[bool, float, dict]:
    """Polls until nothing runs or waits and the KV cache is empty; (idle, seconds, last gauges)."""
    t0 = time.monotonic()
    while True:
        g = gauges(server)
        if not any(g.values()):
            return True, time.monotonic() - t0, g
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0, g
        time.sleep(0.05)


def pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round((len(s) - 1) * q / 100)))]


def greedy(prompt: str, max_tokens: int, stream: bool = False, **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **kw}


async def call(client: httpx.AsyncClient, route: str, body: dict) -> dict:
    """One request, streamed or not: status, latency, text of choice 0, errors seen (in-band too)."""
    t0 = time.perf_counter()
    out = {"status": None, "latency": None, "text": None, "error": None, "chunks": 0}
    try:
        if body.get("stream"):
            async with client.stream("POST", route, json=body) as r:
                out["status"] = r.status_code
                if r.status_code != 200:
                    out["error"] = json.loads(await r.aread())["error"]
                else:
                    texts, done = {}, False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            continue
                        event = json.loads(data)
                        if "error" in event:
                            out["error"] = event["error"]
                            continue
                        out["chunks"] += 1
                        for c in event["choices"]:
                            piece = c.get("text", None)
                            if piece is None:
                                piece = c.get("delta", {}).get("content", "") or ""
                            texts[c["index"]] = texts.get(c["index"], "") + piece
                    out["text"] = texts.get(0, "")
                    out["choices"] = len(texts)
                    if not done:
                        out["error"] = out["error"] or {"message": "stream ended without [DONE]"}
        else:
            r = await client.post(route, json=body)
            out["status"] = r.status_code
            payload = r.json()
            if r.status_code == 200:
                c = payload["choices"]
                out["choices"] = len(c)
                out["text"] = c[0]["text"] if "text" in c[0] else c[0]["message"]["content"]
            else:
                out["error"] = payload["error"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        out["error"] = {"message": f"client: {type(e).__name__}: {e}"}
    out["latency"] = time.perf_counter() - t0
    return out


async def call_raw(url: str, route: str, body: dict) -> dict:
    """`call` over a bare asyncio connection (HTTP/1.1, Connection: close): hundreds at once cost
    the client little, so the latencies measured are the server's, not a busy client's. `latency`
    is the time to the status line (all of a 429), `total` the time to the end of the body."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    out = {"status": None, "latency": None, "total": None, "text": None, "error": None, "chunks": 0}
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (route.encode(), url[7:].encode(), len(data), data))
        await writer.drain()
        status_line = await reader.readline()
        out["latency"] = time.perf_counter() - t0
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        raw = await reader.read()
        writer.close()
        out["total"] = time.perf_counter() - t0
        out["status"] = int(status_line.split()[1])
        if headers.get("transfer-encoding") == "chunked":
            raw = _dechunk(raw)
        text = raw.decode("utf-8")
        if out["status"] != 200:
            out["error"] = json.loads(text)["error"]
        elif headers.get("content-type", "").startswith("text/event-stream"):
            events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
            pieces = []
            for e in events[:-1]:
                event = json.loads(e)
                if "error" in event:
                    out["error"] = event["error"]
                    continue
                out["chunks"] += 1
                pieces += [c.get("text", "") for c in event["choices"] if c["index"] == 0]
            out["text"] = "".join(pieces)
            if not events or events[-1] != "[DONE]":
                out["error"] = out["error"] or {"message": "stream ended without [DONE]"}
        else:
            out["text"] = json.loads(text)["choices"][0]["text"]
    except (OSError, ValueError, IndexError, KeyError) as e:
        out["error"] = {"message": f"client: {type(e).__name__}: {e}"}
    return out


def _dechunk(raw: bytes) -> bytes:
    body, i = [], 0
    while True:
        end = raw.index(b"\r\n", i)
        size = int(raw[i:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(body)
        body.append(raw[end + 2:end + 2 + size])
        i = end + 2 + size + 2


def references(server: Server, max_tokens: int) -> dict:
    """Greedy text per prompt, each sent alone to an idle server."""
    refs = {}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for p in PROMPTS:
            r = c.post("/v1/completions", json=greedy(p, max_tokens))
            r.raise_for_status()
            refs[p] = r.json()["choices"][0]["text"]
    return refs


def log_faults(server: Server) -> list[str]:
    text = Path(server.log_path).read_text()
    return [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line or '" 500' in line]


# --- overload ----------------------------------------------------------------------------------

def run_overload(server: Server, requests: int = 256, waves: int = 2, max_tokens: int = 32, spread: float = 0.5,
                 wave_timeout: float = 120.0, max_429_p95_s: float | None = 2.0) -> dict:
    """Waves of `requests` requests at a server with BATCH + QUEUE places: half of each wave at
    once, the other half arriving over `spread` seconds (so the queue drains and refills while
    the overload goes on). max_429_p95_s: the latency a 429 may take (p95) before it counts as a
    problem; None leaves latency out (the tests: no wall-clock claims there)."""
    problems = []
    refs = references(server, max_tokens)
    pid = server.proc.pid
    figures = {"requests_per_wave": requests, "waves": waves, "capacity": BATCH + QUEUE, "max_tokens": max_tokens,
               "spread_s": spread,
               "accepted": 0, "rejected_429": 0, "wrong_text": 0, "other_errors": 0, "rss_mb": [], "wave_s": [],
               "latency_429_s": {}, "latency_200_s": {}}
    lat429, lat200 = [], []
    figures["rss_before_mb"] = round(rss_mb(pid), 1)  # idle, after the reference requests

    async def wave(i: int):
        bodies = [greedy(PROMPTS[j % len(PROMPTS)], max_tokens, stream=bool(j % 2)) for j in range(requests)]
        rnd = random.Random(i)

        async def later(j, body):
            if j >= requests // 2:
                await asyncio.sleep(rnd.uniform(0, spread))
            return await call_raw(server.url, "/v1/completions", body)

        return await asyncio.wait_for(asyncio.gather(*(later(j, b) for j, b in enumerate(bodies))),
                                      wave_timeout), bodies

    for w in range(waves):
        t0 = time.perf_counter()
        try:
            results, bodies = asyncio.run(wave(w))
        except asyncio.TimeoutError:
            problems.append(f"wave {w} did not finish within {wave_timeout} s (a request hangs)")
            break
        figures["wave_s"].append(round(time.perf_counter() - t0, 2))
        for body, res in zip(bodies, results):
            if res["status"] == 200 and not res["error"]:
                figures["accepted"] += 1
                lat200.append(res["total"])
                if res["text"] != refs[body["prompt"]]:
                    figures["wrong_text"] += 1
                    problems.append(f"wave {w}: {body['prompt']!r} gave {res['text']!r}, "
                                    f"alone it gives {refs[body['prompt']]!r}")
            elif res["status"] == 429:
                figures["rejected_429"] += 1
                lat429.append(res["latency"])
                if (res["error"] or {}).get("code") != "queue_full":
                    problems.append(f"429 without code queue_full: {res['error']}")
            else:
                figures["other_errors"] += 1
                problems.append(f"wave {w}: status {res['status']}: {res['error']}")
        idle, secs, g = wait_idle(server)
        if not idle:
            problems.append(f"wave {w}: not idle {secs:.1f} s after the wave: {g}")
        figures["rss_mb"].append(round(rss_mb(pid), 1))
    figures["latency_429_s"] = {"p50": _r(pct(lat429, 50)), "p95": _r(pct(lat429, 95)), "max": _r(max(lat429, default=None))}
    figures["latency_200_s"] = {"p50": _r(pct(lat200, 50)), "max": _r(max(lat200, default=None))}
    if figures["rejected_429"] == 0:
        problems.append("no request was refused: the overload did not overload")
    if figures["accepted"] < BATCH + QUEUE:
        problems.append(f"only {figures['accepted']} requests accepted; the server holds {BATCH + QUEUE}")
    if lat429 and max_429_p95_s is not None and pct(lat429, 95) > max_429_p95_s:
        problems.append(f"429s are not immediate: p95 {pct(lat429, 95):.2f} s")
    if len(figures["rss_mb"]) >= 2 and figures["rss_mb"][-1] - figures["rss_mb"][0] > RSS_RETURN_MB:
        problems.append(f"RSS grew {figures['rss_mb'][-1] - figures['rss_mb'][0]:.1f} MB from wave 1 to the last")
    figures["lost"] = figures["other_errors"] + figures["wrong_text"]
    figures["problems"] = problems
    return figures


def _r(x, digits=3):
    return None if x is None else round(x, digits)


# --- disconnects -----------------------------------------------------------------------------------

def run_disconnects(server: Server, streams: int = 60, concurrency: int = BATCH + QUEUE, seed: int = 0,
                    timeout: float = 120.0) -> dict:
    """`streams` requests, `concurrency` at a time, each cut by the client at a random point."""
    rnd = random.Random(seed)
    problems = []
    log_before = len(log_faults(server))
    cancelled_label = {"model": MODEL, "finish_reason": "cancelled"}
    cancelled_before = server.metric("pcgpt_requests_total", cancelled_label)
    plans = []
    for i in range(streams):
        kind = rnd.choices(["chunks", "delay", "timeout"], weights=[5, 3, 2])[0]
        plans.append({"kind": kind, "chunks": rnd.randint(0, 40), "delay": rnd.uniform(0.0, 0.6),
                      "timeout": rnd.uniform(0.05, 0.6), "prompt": rnd.choice(PROMPTS),
                      "chat": rnd.random() < 0.3, "seed": i})
    outcomes = {"cut_after_chunks": 0, "cut_after_delay": 0, "client_timeout": 0, "rejected_429": 0,
                "finished_before_cut": 0, "errors": 0}
    sem = asyncio.Semaphore(concurrency)

    async def one(plan):
        async with sem:
            body = {"model": MODEL, "max_tokens": 200, "ignore_eos": True, "temperature": 1.0, "seed": plan["seed"],
                    "stream": plan["kind"] != "timeout"}
            if plan["chat"]:
                route, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": plan["prompt"]}]
            else:
                route, body["prompt"] = "/v1/completions", plan["prompt"]
            # a client of its own: closing it closes the connection, as a browser tab or a killed client does
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                if plan["kind"] == "timeout":
                    try:
                        r = await client.post(route, json=body, timeout=plan["timeout"])
                        outcomes["rejected_429" if r.status_code == 429 else
                                 "finished_before_cut" if r.status_code == 200 else "errors"] += 1
                    except httpx.TimeoutException:
                        outcomes["client_timeout"] += 1
                    return
                async with client.stream("POST", route, json=body) as r:
                    if r.status_code == 429:
                        outcomes["rejected_429"] += 1
                        return
                    if r.status_code != 200:
                        outcomes["errors"] += 1
                        problems.append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
                        return
                    if plan["kind"] == "delay":
                        try:
                            await asyncio.wait_for(_drain(r), plan["delay"])
                            outcomes["finished_before_cut"] += 1
                        except asyncio.TimeoutError:
                            outcomes["cut_after_delay"] += 1
                        return
                    seen = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            if line == "data: [DONE]":
                                outcomes["finished_before_cut"] += 1
                                return
                            if '"error"' in line:
                                outcomes["errors"] += 1
                                problems.append(f"in-band error: {line[:200]}")
                            seen += 1
                            if seen > plan["chunks"]:
                                break
                    outcomes["cut_after_chunks"] += 1
                # leaving both blocks closes the response and the connection mid-stream

    async def main():
        await asyncio.wait_for(asyncio.gather(*(one(p) for p in plans)), timeout)

    elapsed = _run_bounded(main, "the disconnect run", timeout, problems)
    idle, idle_s, g = wait_idle(server, timeout=10)
    if not idle:
        problems.append(f"not idle 10 s after the last cut: {g}")
    cancelled = server.metric("pcgpt_requests_total", cancelled_label) - cancelled_before
    refs = references(server, 16)  # the server still answers, and correctly
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/completions", json=greedy(PROMPTS[0], 16))
        if r.status_code != 200 or r.json()["choices"][0]["text"] != refs[PROMPTS[0]]:
            problems.append(f"after the cuts: {r.status_code} {r.text[:200]}")
    new_faults = log_faults(server)[log_before:]
    if new_faults:
        problems.append(f"server log: {new_faults[:5]}")
    if outcomes["errors"]:
        problems.append(f"{outcomes['errors']} requests failed")
    cut = outcomes["cut_after_chunks"] + outcomes["cut_after_delay"] + outcomes["client_timeout"]
    return {"requests": streams, "concurrency": concurrency, **outcomes, "cut_total": cut,
            "cancelled_metric": int(cancelled), "seconds": round(elapsed, 2), "idle_after_s": round(idle_s, 2),
            "gauges_after": g, "log_errors": len(new_faults), "problems": problems}


async def _drain(response):
    async for _ in response.aiter_lines():
        pass


# --- soak --------------------------------------------------------------------------------------------

def soak_body(rnd: random.Random, i: int) -> tuple[str, dict]:
    kind = rnd.random()
    common = {"model": MODEL, "max_tokens": rnd.randint(1, 8), "stream": rnd.random() < 0.4,
              "temperature": rnd.choice([0, 0.7, 1.0]), "seed": i}
    if rnd.random() < 0.2:
        common["n"] = 2
    if rnd.random() < 0.2:
        common["stop"] = ["\n"]
    if kind < 0.35:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": rnd.choice(PROMPTS)}],
                                        **({"logprobs": True, "top_logprobs": 2} if rnd.random() < 0.2 else {})}
    body = {**common, "prompt": rnd.choice(PROMPTS)}
    if rnd.random() < 0.2:
        body["logprobs"] = 2
    if rnd.random() < 0.1:
        body["echo"] = True
    if rnd.random() < 0.1:
        body["stream_options"] = {"include_usage": True}
        body["stream"] = True
    return "/v1/completions", body


def run_soak(server: Server, requests: int = 3000, concurrency: int = 6, seed: int = 0,
             timeout: float = 600.0) -> dict:
    """`requests` short requests, `concurrency` at a time; with n <= 2 that is at most 12 sequences,
    within BATCH + QUEUE, so none may be refused."""
    rnd = random.Random(seed)
    plan = [soak_body(rnd, i) for i in range(requests)]
    pid = server.proc.pid
    warmup = max(1, requests // 5)
    sample_every = max(10, requests // 40)
    latencies = [None] * requests
    samples = []  # (requests done, RSS MB)
    problems = []
    counts = {"ok": 0, "errors": 0, "rejected_429": 0}
    queue = list(range(requests))
    done = 0

    async def worker(client):
        nonlocal done
        while queue:
            i = queue.pop(0)
            route, body = plan[i]
            res = await call(client, route, body)
            latencies[i] = res["latency"]
            if res["status"] == 200 and not res["error"] and res.get("choices") == body.get("n", 1):
                counts["ok"] += 1
            elif res["status"] == 429:
                counts["rejected_429"] += 1
                problems.append(f"request {i} refused (429) with at most {2 * concurrency} sequences outstanding "
                                f"and {BATCH + QUEUE} places")
            else:
                counts["errors"] += 1
                problems.append(f"request {i} {route} {body}: {res['status']} {res['error']}")
            done += 1
            if done % sample_every == 0 or done == warmup:
                samples.append((done, rss_mb(pid)))

    async def main():
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), timeout)

    rss_start = rss_mb(pid)
    elapsed = _run_bounded(main, "the soak", timeout, problems)
    idle, _, g = wait_idle(server)
    if not idle:
        problems.append(f"not idle after the soak: {g}")
    rss_end = rss_mb(pid)
    after = [(n, m) for n, m in samples if n >= warmup]
    rss_warm = after[0][1] if after else rss_start
    growth = rss_end - rss_warm
    slope = None
    if len(after) >= 3:
        xs, ys = [n for n, _ in after], [m for _, m in after]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 1000 if den else None
    lat = [x for x in latencies[warmup:] if x is not None]
    tenth = max(1, len(lat) // 10)
    first, last = statistics.median(lat[:tenth]) if lat else None, statistics.median(lat[-tenth:]) if lat else None
    if growth > LEAK_MB:
        problems.append(f"RSS grew {growth:.1f} MB after warm-up (limit {LEAK_MB} MB): a leak")
    if counts["ok"] != requests:
        problems.append(f"{requests - counts['ok']} of {requests} requests not answered in full")
    return {"requests": requests, "concurrency": concurrency, **counts, "seconds": round(elapsed, 1),
            "requests_per_s": round(requests / elapsed, 1), "warmup_requests": warmup,
            "rss_start_mb": round(rss_start, 1), "rss_after_warmup_mb": round(rss_warm, 1),
            "rss_end_mb": round(rss_end, 1), "rss_growth_after_warmup_mb": round(growth, 1),
            "rss_slope_mb_per_1000": _r(slope, 2), "rss_samples": [(n, round(m, 1)) for n, m in samples],
            "latency_first_tenth_median_s": _r(first, 4), "latency_last_tenth_median_s": _r(last, 4),
            "latency_drift_ratio": _r(last / first, 2) if first else None, "latency_p99_s": _r(pct(lat, 99), 4),
            "leak_limit_mb": LEAK_MB, "problems": problems[:20]}


# --- faults: bad checkpoints ---------------------------------------------------------------------------

class _RunsCode:
    """Unpickled naively, this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def bad_checkpoints(base: Path, root: Path, marker: Path) -> list[tuple[str, Path, Path]]:
    """(what, path to serve, the file the message must name) for each bad checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file
    from pcgpt.model.checkpoint import load_checkpoint
    cases = []
    d = root / "truncated"
    shutil.copytree(base, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(("truncated safetensors", d, d / "model.safetensors"))
    d = root / "wrong-shapes"
    shutil.copytree(base, d)
    state = load_file(str(d / "model.safetensors"))
    name = next(k for k, v in state.items() if v.dim() == 2 and k != "lm_head.weight")
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(d / "model.safetensors"))
    cases.append(("wrong tensor shape", d, d / "model.safetensors"))
    d = root / "code-ckpt"
    d.mkdir()
    torch.save({"model": {"x": _RunsCode(marker)}, "model_args": {}}, d / "ckpt.pt")
    cases.append(("code-running pickle in ckpt.pt", d / "ckpt.pt", d / "ckpt.pt"))
    # a genuine nanoGPT ckpt.pt with a code-running meta.pkl beside it
    d = root / "code-meta"
    d.mkdir()
    model, tokenizer, _ = load_checkpoint(base)
    c = model.config
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=c.bias,
                vocab_size=c.vocab_size, dropout=0.0)
    torch.save({"model": model.state_dict(), "model_args": args}, d / "ckpt.pt")
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 2, "itos": _RunsCode(marker), "stoi": {}}))
    cases.append(("code-running pickle in meta.pkl", d / "ckpt.pt", d / "meta.pkl"))
    d = root / "code-hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                               "n_positions": 16, "vocab_size": 50257}))
    torch.save({"wte.weight": _RunsCode(marker)}, d / "pytorch_model.bin")
    cases.append(("code-running pickle in HF pytorch_model.bin", d, d / "pytorch_model.bin"))
    return cases


def run_bad_checkpoints(base: Path, root: Path, kinds: tuple[str, ...] = ("truncated", "shape", "pickle"),
                        timeout: float = 90.0) -> dict:
    """`pcgpt serve` on each bad checkpoint (all started at once): each must exit non-zero, naming the
    file, without a traceback and without running the pickle's code."""
    marker = root / "marker"
    cases = [c for c in bad_checkpoints(base, root, marker)
             if any(k in c[0] for k in kinds)]
    procs = []
    for what, path, named in cases:
        p = subprocess.Popen([PCGPT, "serve", "--model", f"x={path}", "--port", str(free_port()), "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append((what, path, named, p, time.monotonic()))
    results, problems = [], []
    for what, path, named, p, t0 in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            problems.append(f"{what}: `pcgpt serve` still running after {timeout} s")
        message = out.strip().splitlines()[-1] if out.strip() else ""
        results.append({"case": what, "exit_code": p.returncode, "message": message[:300]})
        if p.returncode in (0, None):
            problems.append(f"{what}: exit code {p.returncode}")
        if str(named) not in out:
            problems.append(f"{what}: the message does not name {named}: {out[-500:]}")
        if "Traceback" in out:
            problems.append(f"{what}: a traceback instead of a message: {out[-500:]}")
    if marker.exists():
        problems.append("a pickle's code ran while loading")
    return {"cases": results, "code_ran": marker.exists(), "problems": problems}


# --- faults: inside generation -------------------------------------------------------------------------

def run_request_faults(server: Server, max_tokens: int = 24) -> dict:
    """Needs a server started with PCGPT_FAULT_INJECTION=1. Kills its engine at the end."""
    problems = []
    refs = references(server, max_tokens)
    errors_label = {"model": MODEL, "type": "generation_error"}
    errors_before = server.metric("pcgpt_request_errors_total", errors_label)

    async def batch():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            normal = [greedy(p, max_tokens, stream=(i == 3)) for i, p in enumerate(PROMPTS[:4])]
            faulty = [greedy(PROMPTS[4], max_tokens, user="fault:request"),
                      greedy(PROMPTS[5], max_tokens, stream=True, user="fault:request")]
            results = await asyncio.wait_for(
                asyncio.gather(*(call(client, "/v1/completions", b) for b in normal + faulty)), 60)
            return normal, results[:4], results[4:]

    normal, ok, bad = asyncio.run(batch())
    figures = {"batch": len(normal) + 2, "normal_ok": 0, "faulty_failed_cleanly": 0}
    for body, res in zip(normal, ok):
        if res["status"] == 200 and not res["error"] and res["text"] == refs[body["prompt"]]:
            figures["normal_ok"] += 1
        else:
            problems.append(f"a request batched with the faulty ones failed: {res}")
    plain, streamed = bad
    if plain["status"] == 500 and (plain["error"] or {}).get("code") == "generation_failed" \
            and set(plain["error"]) == {"message", "type", "param", "code"}:
        figures["faulty_failed_cleanly"] += 1
    else:
        problems.append(f"non-streamed faulty request: {plain}")
    if streamed["status"] == 200 and streamed["chunks"] >= 1 and (streamed["error"] or {}).get("code") == "generation_failed":
        figures["faulty_failed_cleanly"] += 1
    else:
        problems.append(f"streamed faulty request (wanted 200, a chunk, then an in-band error): {streamed}")
    figures["generation_errors_counted"] = int(server.metric("pcgpt_request_errors_total", errors_label) - errors_before)
    r = httpx.get(server.url + "/ready", timeout=10)
    figures["ready_after_request_faults"] = r.status_code
    if r.status_code != 200:
        problems.append(f"/ready after a failed request: {r.status_code} {r.text}")
    with httpx.Client(base_url=server.url, timeout=30) as c:  # the engine still serves
        r = c.post("/v1/completions", json=greedy(PROMPTS[0], max_tokens))
        if r.status_code != 200 or r.json()["choices"][0]["text"] != refs[PROMPTS[0]]:
            problems.append(f"after the faults: {r.status_code} {r.text[:200]}")

    # the engine loop itself dies
    async def kill():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            running = asyncio.create_task(call(client, "/v1/completions", greedy(PROMPTS[1], 200, stream=True)))
            await asyncio.sleep(0.3)
            dying = await call(client, "/v1/completions", greedy(PROMPTS[2], 4, user="fault:engine"))
            return dying, await asyncio.wait_for(running, 60)

    dying, running = asyncio.run(kill())
    figures["engine_fault_request_status"] = dying["status"]
    if dying["status"] != 500 or "engine failure" not in (dying["error"] or {}).get("message", ""):
        problems.append(f"the request that killed the engine: {dying}")
    figures["running_stream_at_engine_death"] = "error in-band" if running["error"] else "finished"
    ready = httpx.get(server.url + "/ready", timeout=10)
    figures["ready_after_engine_death"] = {"status": ready.status_code, "body": ready.json()}
    if ready.status_code != 503 or not ready.json()["models"][MODEL].startswith("dead: RuntimeError"):
        problems.append(f"/ready after the engine died: {ready.status_code} {ready.text}")
    r = httpx.post(server.url + "/v1/completions", json=greedy(PROMPTS[0], 2), timeout=10)
    figures["request_after_engine_death"] = r.status_code
    if r.status_code != 503 or r.json()["error"]["code"] != "model_unavailable":
        problems.append(f"a request to the dead engine: {r.status_code} {r.text}")
    health = httpx.get(server.url + "/health", timeout=10).status_code
    figures["health_after_engine_death"] = health  # the process lives; readiness is what fails
    figures["problems"] = problems
    return figures


# --- command line ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every run at its default size")
    ap.add_argument("--overload", type=int, metavar="N", help="concurrent requests per wave (default with --all: 512)")
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--disconnects", type=int, metavar="N", help="requests cut (default with --all: 120)")
    ap.add_argument("--soak", type=int, metavar="N", help="soak requests (default with --all: 3000)")
    ap.add_argument("--soak-concurrency", type=int, default=6)
    ap.add_argument("--faults", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    args = ap.parse_args(argv)
    if args.all:
        args.overload = args.overload or 512
        args.disconnects = args.disconnects or 120
        args.soak = args.soak or 3000
        args.faults = True
    if not (args.overload or args.disconnects or args.soak or args.faults):
        ap.error("name a run (--overload N, --disconnects N, --soak N, --faults) or --all")
    report = {"server": {"max_batch_size": BATCH, "max_queue": QUEUE, "model": MODEL}}
    with tempfile.TemporaryDirectory(prefix="pcgpt-reliability-") as tmp:
        tmp = Path(tmp)
        ckpt = snapshot_baseline(tmp / "ckpt")
        if args.overload or args.disconnects or args.soak:
            with serve(ckpt, tmp / "server.log") as s:
                if args.overload:
                    report["overload"] = _show("overload", run_overload(s, args.overload, args.waves))
                if args.disconnects:
                    report["disconnects"] = _show("disconnects", run_disconnects(s, args.disconnects))
                if args.soak:
                    report["soak"] = _show("soak", run_soak(s, args.soak, args.soak_concurrency))
        if args.faults:
            report["bad_checkpoints"] = _show("bad checkpoints", run_bad_checkpoints(ckpt, tmp / "bad"))
            with serve(ckpt, tmp / "faults.log", True, *FAULTS_SERVER_ARGS) as s:
                report["request_faults"] = _show("request faults", run_request_faults(s))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("problems")]
    print(f"written {out}; " + (f"FAILED: {', '.join(failed)}" if failed else "all runs passed"))
    return 1 if failed else 0


def _show(name: str, figures: dict) -> dict:
    shown = {k: v for k, v in figures.items() if k not in ("rss_samples",)}
    print(f"== {name}: " + ("passed" if not figures["problems"] else "FAILED"))
    print(json.dumps(shown, indent=1))
    return figures


if __name__ == "__main__":
    sys.exit(main())
