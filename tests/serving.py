"""Real `pcgpt serve` processes for the integration tests (uvicorn on a free loopback port)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
PCGPT = str(Path(sys.executable).parent / "pcgpt")
BASELINE = ROOT / "pcgpt" / "checkpoints" / "shakespeare-char"
PC = ROOT / "pcgpt" / "checkpoints" / "shakespeare-char-pc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot_baseline(dst: Path) -> Path:
    """A private copy of the shipped baseline, for tests that write beside their checkpoint."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(BASELINE / name, dst / name)
    return dst


def make_pc_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A PC model over the shipped baseline with non-trivial random generators (for tests that
    need settling to move regardless of how the shipped PC checkpoint was trained)."""
    from pcgpt.model.checkpoint import load_checkpoint, save_pcgpt
    from pcgpt.model.pc import PCGPT
    base, tokenizer, _ = load_checkpoint(BASELINE)
    torch.manual_seed(seed)
    pc = PCGPT.from_baseline(base)
    for g in pc.generators:
        torch.nn.init.normal_(g.c_proj.weight, std=0.05)
    save_pcgpt(directory, pc, tokenizer, {"sampler": {"tau": 2.2}})
    return directory


class Server:
    """A `pcgpt serve` subprocess; use as a context manager."""

    def __init__(self, models: dict[str, Path | str], *extra: str, env: dict | None = None, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [PCGPT, "serve", "--port", str(self.port), "--threads", "1"]
        for name, path in models.items():
            args += ["--model", f"{name}={path}"]
        self.args = args + list(extra)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc = None

    def __enter__(self) -> "Server":
        self.log = open(self.log_path, "w+") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pcgpt serve exited with {self.proc.returncode}: {self.read_log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"pcgpt serve did not become ready: {self.read_log()}")

    def read_log(self) -> str:
        if self.log_path and Path(self.log_path).exists():
            return Path(self.log_path).read_text()[-4000:]
        return "(no log kept)"

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, as a container runtime sends; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.log_path:
            self.log.close()

    def metric(self, name: str, labels: dict | None = None) -> float:
        """Sum of a metric's samples on /metrics whose labels include `labels`."""
        text = httpx.get(self.url + "/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric_name = series.split("{", 1)[0]
            if metric_name != name:
                continue
            if labels and not all(f'{k}="{v}"' in series for k, v in labels.items()):
                continue
            total += float(value)
        return total
