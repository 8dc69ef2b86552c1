"""Start-up of the `pcgpt` command: the wall time of `pcgpt --help`, and of `pcgpt generate` until
its first generated character reaches stdout (time to first token, model load included).

    .venv/bin/python -m bench.cli_startup [--repeats 5]

Each measurement is a fresh process (`python -m pcgpt.cli`, so PYTHONPATH can point it at another
checkout to compare); the two are interleaved and the median and range printed.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "pcgpt", "checkpoints", "shakespeare-char")
PROMPT = "ROMEO:"


def time_help() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pcgpt.cli", "--help"], check=True, capture_output=True)
    return time.perf_counter() - t0


def time_first_token() -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pcgpt.cli", "generate", "--model", CHECKPOINT, "--prompt",
                             PROMPT, "--max-tokens", "20", "--temperature", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    while len(seen) <= len(PROMPT):  # the prompt is echoed first; the next byte is generated text
        chunk = proc.stdout.read1(64)
        if not chunk:
            raise RuntimeError("generate ended before its first token")
        seen += chunk
    elapsed = time.perf_counter() - t0
    proc.communicate()
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {"pcgpt --help": [], "pcgpt generate, first token": []}
    for _ in range(args.repeats):
        results["pcgpt --help"].append(time_help())
        results["pcgpt generate, first token"].append(time_first_token())
    for name, times in results.items():
        print(f"{name:<30} median {statistics.median(times):.2f} s  (range {min(times):.2f}-{max(times):.2f} s, "
              f"{len(times)} runs)")


if __name__ == "__main__":
    main()
