"""A real Prometheus (Debian's `prometheus` binary) scraping a test server, and the dashboard's
PromQL read out of deploy/grafana/dashboards/pcgpt.json; shared by tests/test_deploy.py and
bench/render_dashboard.py."""

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx

from serving import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pcgpt.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"


def scrape_config(target: str, self_target: str, interval: str = "1s") -> str:
    """deploy/prometheus.yml with the compose host names replaced by loopback ports and a short
    scrape interval: the shipped jobs, paths and relabelling, only faster and local."""
    text = PROMETHEUS_YML.read_text()
    for old, new in (('"pcgpt:8000"', f'"{target}"'), ('"localhost:9090"', f'"{self_target}"')):
        assert old in text, f"{PROMETHEUS_YML} no longer scrapes {old}; update tests/prometheus_stack.py"
        text = text.replace(old, new)
    text = re.sub(r"(scrape_interval|evaluation_interval):\s*\S+", rf"\1: {interval}", text)
    return re.sub(r"scrape_timeout:\s*\S+", f"scrape_timeout: {interval}", text)


class Prometheus:
    """`prometheus` on a free loopback port with a throwaway TSDB; a context manager."""

    def __init__(self, target: str, workdir: Path, interval: str = "1s"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(scrape_config(target, f"127.0.0.1:{self.port}", interval))
        self.log_path = self.workdir / "prometheus.log"
        self.proc = None

    def __enter__(self) -> "Prometheus":
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: `make deps-system` installs Debian's package")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"prometheus did not become ready: {self.log_path.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def _get(self, path: str, **params) -> dict:
        r = httpx.get(self.url + path, params=params, timeout=30)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: HTTP {r.status_code}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def wait_for(self, expr: str, predicate, timeout: float = 30) -> float:
        """Polls an instant query until predicate(value of its first sample) holds; returns the value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                value = float(result[0]["value"][1])
                if predicate(value):
                    return value
            time.sleep(0.25)
        raise TimeoutError(f"{expr}: still {value} after {timeout} s; log: {self.log_path.read_text()[-2000:]}")


# --- the dashboard ----------------------------------------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows and panels inside collapsed rows included."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query of every panel."""
    return [(p, t) for p in all_panels(dashboard) for t in p.get("targets", [])]


def grafana_regex(values: list[str]) -> str:
    """What Grafana puts for a multi-value Prometheus variable inside =~: (a|b), regex-escaped."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, models: list[str], rate_interval: str = "15s", interval: str = "5s") -> str:
    """Grafana's variables as Grafana would fill them for the selected models."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", interval).replace("$__range", "5m")
    out = out.replace("${model}", "$model").replace("$model", grafana_regex(models))
    assert "$" not in out, f"a variable the tests do not substitute is left in {out!r}"
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(pcgpt_[a-z0-9_]+)\b", expr))


# --- load ---------------------------------------------------------------------------------------------

PROMPTS = ["ROMEO:\n", "JULIET:\nO ", "First Citizen:\nWe are ", "KING HENRY:\n", "To be, or ", "MENENIUS:\nWhat "]


def drive_load(url: str, base: str, pc: str, seconds: float = 0.0, rounds: int = 1, concurrency: int = 4,
               max_tokens: int = 24, seed: int = 0) -> dict:
    """Completions to both models from `concurrency` threads: with and without per-token uncertainty,
    PC requests at settle_steps 0/1/2, some streamed, some stopped by a stop string, some cut by
    max_tokens; plus one request that fails on a real model (settle_steps on the baseline) and one for
    an unknown model. Runs `rounds` rounds, then keeps going until `seconds` have passed. Returns counts."""
    counts = {"ok": 0, "error": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def one(i: int, client: httpx.Client) -> None:
        model = pc if i % 2 else base
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens - (i % 3) * 4,
                "temperature": 0.8 + 0.1 * (i % 3), "seed": seed + i, "uncertainty": i % 3 != 2}
        if model == pc:
            body["settle_steps"] = i % 3
        if i % 4 == 1:
            body["stop"] = ["\n"]
        if i % 5 == 3:
            body["stream"] = True
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                for _ in r.iter_lines():
                    pass
                ok = r.status_code == 200
        else:
            ok = client.post(url + "/v1/completions", json=body).status_code == 200
        with lock:
            counts["ok" if ok else "error"] += 1

    def worker(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while n < rounds or time.monotonic() < stop_at:
                one(k + n * concurrency, client)
                n += 1

    with httpx.Client(timeout=60) as client:  # the errors, one of each kind
        bad = client.post(url + "/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 2, "settle_steps": 2})
        assert bad.status_code == 400, bad.text
        missing = client.post(url + "/v1/completions", json={"model": "no-such-model", "prompt": "x", "max_tokens": 2})
        assert missing.status_code == 404, missing.text
        counts["error"] += 2
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts
