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
SHIPPED = ("shakespeare-char", "shakespeare-char-pc")  # what `pcgpt serve` serves by default
START_HANG_GUARD_S = 120  # a server not ready by then is stuck, even on a loaded machine


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


def environment(overrides: dict | None = None) -> dict:
    """This process's environment with `overrides` laid over it (a value of None removes the variable)."""
    return {k: v for k, v in {**os.environ, **(overrides or {})}.items() if v is not None}


class Server:
    """A `pcgpt serve` subprocess; use as a context manager. `models`: served name -> checkpoint
    (None: the shipped default). `env` is laid over this process's environment (a value of None
    removes the variable); `executable` is the `pcgpt` to run, `cwd` where."""

    def __init__(self, models: dict[str, Path | str] | None, *extra: str, env: dict | None = None,
                 log_path: Path | None = None, executable: str | Path = PCGPT, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [str(executable), "serve", "--port", str(self.port), "--threads", "1"]
        for name, path in (models or {}).items():
            args += ["--model", f"{name}={path}"]
        self.args = args + list(extra)
        self.env = environment(env)
        self.cwd = cwd
        self.log_path = log_path
        self.proc = None

    def __enter__(self) -> "Server":
        self.log = open(self.log_path, "w+") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + START_HANG_GUARD_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pcgpt serve exited with {self.proc.returncode}: {self.read_log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
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


def check_serves_shipped_models(url: str) -> None:
    """A server started with no --model serves both shipped checkpoints: ready, listed, and each
    answers a completion (the PC model with its uncertainty)."""
    with httpx.Client(base_url=url, timeout=120) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200 and set(ready.json()["models"]) == set(SHIPPED), ready.text
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert sorted(cards) == sorted(SHIPPED)
        assert (cards["shakespeare-char"]["model_type"], cards["shakespeare-char-pc"]["model_type"]) == ("gpt", "pc")
        for name in SHIPPED:
            r = client.post("/v1/completions", json={"model": name, "prompt": "ROMEO:", "max_tokens": 4,
                                                    "uncertainty": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert len(choice["text"]) == 4 and len(choice["uncertainty"]) == 4, choice  # char models
        assert "pcgpt_generation_tokens_total" in client.get("/metrics").text
