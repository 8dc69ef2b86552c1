"""Shared helpers for the benchmarks: machine description, timing, statistics, result files."""

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHAR_CKPT = ROOT / "pcgpt" / "checkpoints" / "shakespeare-char"
CHAR_PC_CKPT = ROOT / "pcgpt" / "checkpoints" / "shakespeare-char-pc"

# one thread count for every in-process comparison (ours, HF, nanoGPT's way); override with
# PCGPT_BENCH_THREADS. The default is every core the machine has.
THREADS = int(os.environ.get("PCGPT_BENCH_THREADS", "0")) or os.cpu_count() or 1


def set_threads(n: int = THREADS) -> int:
    torch.set_num_threads(n)
    return n


def machine() -> dict:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown"
    cores = os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = {}
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
        model = info.get("Model name", model)
        cores = int(info.get("CPU(s)", cores))
        flags = info.get("Flags", "").split()
    except (OSError, subprocess.SubprocessError, ValueError):
        flags = []
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return {
        "cpu": model,
        "cores": cores,
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
        "memory_bytes": mem,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def percentile(xs, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM. (ru_maxrss is not used: Linux carries it over from
    the parent across fork and exec, so a child started by a big process reports the parent's.)"""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    return path


def read_json(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def fmt(x, digits=1) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, float) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the server and its engine processes)."""
    pids = [pid]
    for p in pids:
        for task in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return pids
