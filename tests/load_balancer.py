"""Debian's nginx in front of local `pcgpt serve` replicas, least_conn, on loopback, with the proxy
settings of deploy/nginx/ (the files docker-compose.replicas.yml mounts), for tests/test_replicas.py
and bench/replicas.py. Also a bounded streaming load through it."""

import json
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serving import free_port

ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = ROOT / "deploy" / "nginx"
START_HANG_GUARD_S = 20


class Nginx:
    """nginx (foreground, one worker) balancing `upstream_ports` with least_conn; use as a
    context manager. `fail_timeout`: how long a replica that refused a connection is skipped."""

    def __init__(self, upstream_ports: list[int], directory: Path, fail_timeout_s: int = 10):
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(self.binary).exists():
            raise RuntimeError("nginx is not installed: `make deps-system` installs Debian's package")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.access_log = self.dir / "access.log"
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout={fail_timeout_s}s;"
                            for p in upstream_ports)
        temp = "\n".join(f"    {kind}_temp_path {self.dir / kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(f"""
worker_processes 1;
daemon off;
pid {self.dir / 'nginx.pid'};
error_log {self.dir / 'error.log'} notice;
events {{ worker_connections 1024; }}
http {{
{temp}
    include {NGINX_DIR / 'pcgpt-http.conf'};
    access_log {self.access_log} pcgpt;
    upstream pcgpt {{
        least_conn;
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        include {NGINX_DIR / 'pcgpt-server.conf'};
    }}
}}
""")
        self.proc = None

    def __enter__(self) -> "Nginx":
        check = subprocess.run([self.binary, "-t", "-c", str(self.conf), "-e", str(self.dir / "error.log")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf), "-e", str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_HANG_GUARD_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "error.log").read_text()
            try:
                httpx.get(self.url + "/health", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_entries(self) -> dict[str, dict]:
        """The access log by request id: upstream addresses (in the order nginx tried them), their
        statuses, the status the client got."""
        entries = {}
        pattern = re.compile(r'^(\S+) (\S+) "([^"]*)" (\d+) upstream=(.*) upstream_status=(.*) request_time=(\S+)$')
        for line in self.access_log.read_text().splitlines():
            m = pattern.match(line)
            if not m:
                continue
            entries[m.group(2)] = {"request": m.group(3), "status": int(m.group(4)),
                                   "upstreams": [a.strip() for a in m.group(5).split(",")],
                                   "upstream_statuses": [s.strip() for s in m.group(6).split(",")],
                                   "request_time": float(m.group(7))}
        return entries


@dataclass
class Outcome:
    request_id: str
    started: float  # time.monotonic()
    ended: float = 0.0
    ok: bool = False
    tokens: int = 0
    error: str = ""


@dataclass
class StreamingLoad:
    """`workers` threads, each sending streaming completions back to back through `url` until
    stop() or `max_requests` in all; every request has its own X-Request-Id."""
    url: str
    model: str
    workers: int = 6
    max_tokens: int = 32
    max_requests: int = 10_000
    hang_guard_s: float = 60
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent = 0
        self._threads = [threading.Thread(target=self._worker, args=(w,), daemon=True) for w in range(self.workers)]

    def start(self) -> "StreamingLoad":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(self.hang_guard_s)
        assert not any(t.is_alive() for t in self._threads), "a load worker hangs"
        return self.outcomes

    def _next_id(self, worker: int) -> str | None:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests:
                return None
            self._sent += 1
            return f"load-{worker}-{self._sent}"

    def _worker(self, worker: int) -> None:
        body = {"model": self.model, "prompt": "ROMEO:", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=self.url, timeout=self.hang_guard_s) as client:
            while (request_id := self._next_id(worker)) is not None:
                outcome = Outcome(request_id, time.monotonic())
                with self._lock:
                    self.outcomes.append(outcome)
                try:
                    with client.stream("POST", "/v1/completions", json=body,
                                       headers={"X-Request-Id": request_id}) as r:
                        if r.status_code != 200:
                            outcome.error = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                        else:
                            done = False
                            for line in r.iter_lines():
                                if line == "data: [DONE]":
                                    done = True
                                elif line.startswith("data: "):
                                    choices = json.loads(line[6:]).get("choices") or [{}]
                                    outcome.tokens += len(choices[0].get("text", ""))  # char model: a character per token
                            outcome.ok = done and outcome.tokens == self.max_tokens
                            if not outcome.ok:
                                outcome.error = f"stream ended after {outcome.tokens} tokens, [DONE]={done}"
                except httpx.HTTPError as e:
                    outcome.error = f"{type(e).__name__}: {e}"
                outcome.ended = time.monotonic()
