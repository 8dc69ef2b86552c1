"""Hostile clients against a real `pcgpt serve` on loopback: what they cost the server, and whether
/health and a completion still answer meanwhile (the figures of RELIABILITY.md).

  .venv/bin/python -m bench.attack --all                 # every attack at its default size
  .venv/bin/python -m bench.attack --header-flood 10     # seconds of each attack alone
  .venv/bin/python -m bench.attack --slowloris 600
  .venv/bin/python -m bench.attack --metrics-flood 50
  .venv/bin/python -m bench.attack --all -- --max-connections 1024   # flags after -- go to pcgpt serve

  header-flood   4 connections for N seconds: 2 stream one header value without end, 2 send
                 small header fields without end. Reported: the HTTP process's RSS (start, peak),
                 /health latency (median, max, failures) probed every 0.1 s, and how and when
                 each attacker's connection ended (the server's answer, or none).
  slowloris      N connections each send part of a request head, then one more header field
                 every 2 s (never finishing the head) for 15 s. Reported: attacker connections the
                 server still holds after 5 s and at the end, /health latency, RSS.
  metrics-flood  N concurrent /metrics scrapers, 84 scrapes/s together, for 15 s while greedy
                 32-token completions run one after another; the completions' median latency
                 without the flood is measured first.

The server runs the shipped baseline with its default limits (or the flags after --). The results
go to bench/results/attack.json.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.serving import BASELINE, Server  # noqa: E402

MODEL = "shakespeare-char"
PROBE_EVERY_S = 0.1
HEALTH_TIMEOUT_S = 10.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def probe(server: Server, seconds: float) -> dict:
    """/health latency (a new connection each time, as a load balancer's check) and the HTTP
    process's RSS, every PROBE_EVERY_S for `seconds`."""
    latencies, failures, rss = [], 0, []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        while time.monotonic() < deadline:
            rss.append(rss_mb(server.proc.pid))
            t = time.perf_counter()
            try:
                ok = (await c.get(server.url + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - t) * 1000)
            failures += not ok
            await asyncio.sleep(PROBE_EVERY_S)
    return {"health_ms_median": round(statistics.median(latencies), 1), "health_ms_max": round(max(latencies), 1),
            "health_probes": len(latencies), "health_failures": failures,
            "rss_mb_start": round(rss[0], 1), "rss_mb_peak": round(max(rss), 1)}


async def _send_until_answered(server: Server, head: bytes, piece: bytes, seconds: float) -> str:
    """Sends `head`, then `piece` after `piece`, until the server answers or closes (or `seconds`
    pass); says how the connection ended and when."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    start = time.monotonic()
    answer = asyncio.create_task(reader.read(65536))
    try:
        writer.write(head)
        while time.monotonic() - start < seconds and not answer.done():
            writer.write(piece)
            await writer.drain()
        first = await asyncio.wait_for(answer, 1.0)
        how = first.split(b"\r\n", 1)[0].decode() if first else "closed"
    except asyncio.TimeoutError:
        how = "no answer"
    except (ConnectionError, OSError):
        how = "reset"
    finally:
        answer.cancel()
        writer.close()
    return f"{how} after {time.monotonic() - start:.2f} s"


async def header_flood(server: Server, seconds: float) -> dict:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    attackers = [_send_until_answered(server, head + b"X-Long: ", b"a" * 65536, seconds) for _ in range(2)]
    attackers += [_send_until_answered(server, head, b"X: 1\r\n" * 8192, seconds) for _ in range(2)]
    *ends, figures = await asyncio.gather(*attackers, probe(server, seconds))
    return {**figures, "attackers": ends}


async def slowloris(server: Server, connections: int, seconds: float = 15.0) -> dict:
    start = time.monotonic()
    closed_at: dict[int, float] = {}  # attacker -> seconds after the start at which the server closed it
    opened = 0

    async def one(i):
        nonlocal opened
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            closed_at[i] = 0.0
            return
        opened += 1
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() - start < seconds:
                try:
                    if not await asyncio.wait_for(reader.read(65536), 2.0):
                        break  # closed by the server (after its 408 or 503)
                except asyncio.TimeoutError:
                    writer.write(b"X-%d: 1\r\n" % i)  # one more field, never the end of the head
            else:
                return
        except (ConnectionError, OSError):
            pass
        closed_at[i] = time.monotonic() - start
        writer.close()

    tasks = [asyncio.create_task(one(i)) for i in range(connections)]
    figures = await probe(server, seconds)
    await asyncio.gather(*tasks)
    return {**figures, "connections_opened": opened,
            "held_after_5s": connections - sum(t <= 5 for t in closed_at.values()),
            "held_at_end": connections - len(closed_at)}


async def metrics_flood(server: Server, scrapers: int, rate: float = 84.0, seconds: float = 15.0) -> dict:
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 32, "temperature": 0, "ignore_eos": True}

    async def completions(c, until):
        times = []
        while time.monotonic() < until:
            t = time.perf_counter()
            r = await c.post(server.url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            times.append((time.perf_counter() - t) * 1000)
        return times

    async def scrape(c, until, offset):
        # each scraper at rate / scrapers per second: together `rate` a second, as a crowd of
        # Prometheus servers would, not as fast as the client can go
        every = scrapers / rate
        n, next_at = 0, time.monotonic() + offset * every / scrapers
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                n += (await c.get(server.url + "/metrics")).status_code == 200
            except httpx.HTTPError:  # counted as not answered
                pass
            next_at += every
        return n

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=scrapers + 1)) as c:
        quiet = await completions(c, time.monotonic() + seconds / 3)
        until = time.monotonic() + seconds
        busy, *scrapes = await asyncio.gather(completions(c, until), *(scrape(c, until, i) for i in range(scrapers)))
    return {"completion_ms_median_quiet": round(statistics.median(quiet), 1),
            "completion_ms_median_flood": round(statistics.median(busy), 1),
            "scrapes_per_s": round(sum(scrapes) / seconds, 1),
            "scrapes_unanswered": round(seconds * rate) - sum(scrapes)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every attack at its default size")
    ap.add_argument("--header-flood", type=float, metavar="SECONDS", help="default with --all: 10")
    ap.add_argument("--slowloris", type=int, metavar="N", help="connections (default with --all: 600)")
    ap.add_argument("--metrics-flood", type=int, metavar="N", help="scrapers (default with --all: 50)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "attack.json"))
    args = ap.parse_args(argv)
    if args.all:
        args.header_flood = args.header_flood or 10.0
        args.slowloris = args.slowloris or 600
        args.metrics_flood = args.metrics_flood or 50
    runs = {"header_flood": args.header_flood and (lambda s: header_flood(s, args.header_flood)),
            "slowloris": args.slowloris and (lambda s: slowloris(s, args.slowloris)),
            "metrics_flood": args.metrics_flood and (lambda s: metrics_flood(s, args.metrics_flood))}
    results = {"serve_args": serve_args}
    for name, run in runs.items():
        if not run:
            continue
        log = Path(args.out).with_name(f"attack-{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with Server({MODEL: BASELINE}, *serve_args, log_path=log) as server:  # a fresh server per attack
            results[name] = asyncio.run(run(server))
        print(name, json.dumps(results[name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
