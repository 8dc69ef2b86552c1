"""How long a hung or dead engine takes to be detected and to serve again, against a real
`pcgpt serve` (the two shipped models) on loopback.

  nice -n 10 .venv/bin/python -m bench.engine_recovery                       # the defaults
  nice -n 10 .venv/bin/python -m bench.engine_recovery --watchdog 5 --rounds 3

  hung  SIGSTOP on the baseline's engine while a stream runs on it: seconds until the stream's
        in-band error (detected: the watchdog killed it), then until /ready answers 200 again.
  dead  SIGKILL on it while a stream runs: seconds until the in-band error, then until /ready 200.
Meanwhile the other model is asked for a completion: it must answer (reported as other_model_ok).
A recovery is the restart backoff (--engine-restart-backoff, 1 s the first time) plus the time the
new engine process takes to import torch and load the model. Results go to
bench/results/engine_recovery.json.
"""

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.serving import BASELINE, PC, Server  # noqa: E402

BASE, PCM = "shakespeare-char", "shakespeare-char-pc"


def engine_pid(log: Path) -> int:
    return int(re.findall(rf"engine {BASE}: process (\d+) started", log.read_text())[-1])


def one_round(server: Server, log: Path, sig: int) -> dict:
    body = {"model": BASE, "prompt": "ROMEO:", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=300) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(engine_pid(log), sig)
            t0 = time.monotonic()
            other = c.post("/v1/completions", json={"model": PCM, "prompt": "ROMEO:", "max_tokens": 4})
            error = next((line for line in lines if '"error"' in line), None)
            detected = time.monotonic() - t0
            list(lines)
        while c.get("/ready").status_code != 200:
            time.sleep(0.05)
        recovered = time.monotonic() - t0
    return {"detected_s": round(detected, 2), "recovered_s": round(recovered, 2),
            "in_band_error": error is not None, "other_model_ok": other.status_code == 200}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--watchdog", type=float, default=30.0, help="--engine-watchdog-seconds (default: the server's, 30)")
    ap.add_argument("--rounds", type=int, default=3, help="hung and dead rounds each")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_recovery.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        # restarts in a row back off 1, 2, 4 ... s: each round reports its backoff, and the rest of
        # its recovery (restart_s: spawning the process, importing torch, loading the model)
        with Server({BASE: BASELINE, PCM: PC}, "--engine-watchdog-seconds", str(args.watchdog),
                    "--max-engine-restarts", str(2 * args.rounds), log_path=log) as server:
            results = {"hung": [], "dead": []}
            restarts = 0
            for _ in range(args.rounds):
                for kind, sig in (("hung", signal.SIGSTOP), ("dead", signal.SIGKILL)):
                    figures = one_round(server, log, sig)
                    figures["backoff_s"] = min(2.0 ** restarts, 60.0)
                    figures["restart_s"] = round(figures["recovered_s"] - figures["detected_s"] - figures["backoff_s"], 2)
                    restarts += 1
                    results[kind].append(figures)
                    print(kind, figures, flush=True)
    report = {"watchdog_s": args.watchdog, "rounds": results,
              "median": {kind: {k: statistics.median(r[k] for r in rounds) for k in ("detected_s", "restart_s")}
                         for kind, rounds in results.items()}}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
