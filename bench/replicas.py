"""Replicas behind a load balancer: 1, 2 and 3 `pcgpt serve` replicas (the baseline char model each)
behind Debian's nginx in least_conn mode (deploy/nginx/'s proxy settings), under the same
streaming load: a fixed number of clients sending streamed completions back to back for a fixed
time. Reported per replica count: requests and errors, generated tokens/s in all and per replica,
each replica's share of the requests (from nginx's access log), end-to-end latency.

    .venv/bin/python -m bench.replicas [--rounds 2] [--seconds 15] [--clients 12] [--max-tokens 64] [--replicas 1 2 3]

All replicas share this machine's cores: each is an HTTP process plus an engine process, so one
replica can already keep two cores busy, and on a 2-core machine more replicas divide the same
cores (the figures show the balancer's spread and overhead, not scaling). With a machine (or a GPU)
per replica, tokens/s would add up per replica, up to what the balancer forwards. Results:
bench/results/replicas.json.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench.common import machine, percentile, write_json  # noqa: E402
from load_balancer import Nginx, StreamingLoad  # noqa: E402
from serving import BASELINE, Server  # noqa: E402

MODEL = "shakespeare-char"


def run(replica_count: int, seconds: float, clients: int, max_tokens: int, max_batch_size: int, threads: int,
        workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    replicas = [Server({MODEL: BASELINE}, "--max-batch-size", str(max_batch_size), "--replica-id", f"replica-{i}",
                       log_path=workdir / f"replica-{i}.log") for i in range(replica_count)]
    for r in replicas:  # --threads: Server passes 1; the last flag wins
        r.args += ["--threads", str(threads)]
    with contextlib.ExitStack() as stack:
        for replica in replicas:  # stop() is safe on a replica that never started
            stack.callback(replica.stop)
        with ThreadPoolExecutor(replica_count) as pool:
            list(pool.map(lambda r: r.__enter__(), replicas))
        nginx = stack.enter_context(Nginx([r.port for r in replicas], workdir / "nginx"))
        # warm-up: each replica's first requests pay one-time costs
        StreamingLoad(nginx.url, MODEL, workers=clients, max_tokens=8, max_requests=2 * clients).start().stop()
        before = {r.port: r.metric("pcgpt_generation_tokens_total") for r in replicas}
        load = StreamingLoad(nginx.url, MODEL, workers=clients, max_tokens=max_tokens, max_requests=1_000_000)
        t0 = time.monotonic()
        load.start()
        time.sleep(seconds)
        outcomes = load.stop()
        elapsed = time.monotonic() - t0
        generated = {r.port: r.metric("pcgpt_generation_tokens_total") - before[r.port] for r in replicas}
        deadline = time.monotonic() + 10  # nginx logs a request just after closing it
        while time.monotonic() < deadline and not {o.request_id for o in outcomes} <= set(nginx.log_entries()):
            time.sleep(0.05)
        entries = nginx.log_entries()
    ok = [o for o in outcomes if o.ok]
    per_replica = []
    for i, r in enumerate(replicas):
        address = f"127.0.0.1:{r.port}"
        served = [o for o in outcomes if o.request_id in entries and entries[o.request_id]["upstreams"][-1] == address]
        per_replica.append({"replica": f"replica-{i}", "requests": len(served),
                            "errors": sum(not o.ok for o in served),
                            "share": round(len(served) / max(1, len(outcomes)), 3),
                            "tokens_per_s": round(generated[r.port] / elapsed, 1)})
    latencies = [o.ended - o.started for o in ok]
    return {"replicas": replica_count, "clients": clients, "seconds": round(elapsed, 2),
            "requests": len(outcomes), "errors": len(outcomes) - len(ok),
            "tokens_per_s": round(sum(o.tokens for o in ok) / elapsed, 1),
            "e2e_s": {"p50": round(statistics.median(latencies), 3) if latencies else None,
                      "p99": round(percentile(latencies, 99), 3) if latencies else None},
            "per_replica": per_replica}


def summary(runs: list[dict]) -> list[dict]:
    """Per replica count: the median and range over the rounds of tokens/s, and the totals."""
    out = []
    for n in sorted({r["replicas"] for r in runs}):
        mine = [r for r in runs if r["replicas"] == n]
        rates = [r["tokens_per_s"] for r in mine]
        out.append({"replicas": n, "rounds": len(mine), "tokens_per_s_median": round(statistics.median(rates), 1),
                    "tokens_per_s_range": [min(rates), max(rates)],
                    "requests": sum(r["requests"] for r in mine), "errors": sum(r["errors"] for r in mine),
                    "e2e_p50_s_median": round(statistics.median(r["e2e_s"]["p50"] for r in mine), 3),
                    "share_per_replica_median": [round(statistics.median(r["per_replica"][i]["share"] for r in mine), 3)
                                                 for i in range(n)]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=2, help="each replica count this many times, interleaved")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica's engine")
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for n in args.replicas:
                result = run(n, args.seconds, args.clients, args.max_tokens, args.max_batch_size, args.threads,
                             Path(tmp) / f"round{round_}-r{n}")
                runs.append(result)
                shares = ", ".join(f"{p['replica']} {p['requests']} req {p['tokens_per_s']} tok/s"
                                   for p in result["per_replica"])
                print(f"{n} replica(s): {result['tokens_per_s']} tok/s, {result['requests']} requests, "
                      f"{result['errors']} errors, e2e p50 {result['e2e_s']['p50']} s; {shares}", flush=True)
    command = "python -m bench.replicas " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_json("replicas", {"machine": machine(), "command": command.strip(), "model": MODEL,
                                   "clients": args.clients, "seconds": args.seconds,
                                   "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
                                   "threads_per_replica": args.threads, "summary": summary(runs), "runs": runs})
    for row in summary(runs):
        print(row)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
