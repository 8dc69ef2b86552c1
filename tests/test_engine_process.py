"""Each model's engine runs in a process of its own (pcgpt/serve/engine_process.py): the processes exist,
their metrics reach /metrics, a killed engine process fails its requests and the server's
readiness instead of hanging them, and no engine process outlives its server."""

import json
import os
import signal
import time

import httpx
import pytest

from bench.common import process_tree
from serving import BASELINE, PC, Server

pytestmark = pytest.mark.server

BASE, PCM = "shakespeare-char", "shakespeare-char-pc"


def wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def engine_pids(server: Server) -> list[int]:
    """The server's engine processes (spawned; multiprocessing's resource tracker is a child too)."""
    pids = []
    for p in process_tree(server.proc.pid):
        try:
            if p != server.proc.pid and b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read():
                pids.append(p)
        except OSError:
            pass
    return pids


@pytest.fixture()
def server(tmp_path):
    # a restart far off: the test looks at the dead engine (tests/test_hardening_engine.py restarts one)
    with Server({BASE: BASELINE, PCM: PC}, "--max-batch-size", "4", "--engine-restart-backoff", "600",
                log_path=tmp_path / "server.log") as s:
        yield s


def test_one_engine_process_per_model_with_its_metrics(server):
    pids = engine_pids(server)
    assert len(pids) == 2, pids
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for model, n in ((BASE, 7), (PCM, 5)):
            r = c.post("/v1/completions", json={"model": model, "prompt": "ROMEO:", "max_tokens": n})
            assert r.status_code == 200, r.text
    # engine series come from the engine processes, labelled per model, in one valid exposition
    assert server.metric("pcgpt_generation_tokens_total", {"model": BASE}) == 7
    assert server.metric("pcgpt_generation_tokens_total", {"model": PCM}) == 5
    assert server.metric("pcgpt_time_to_first_token_seconds_count", {"model": PCM}) == 1
    text = httpx.get(server.url + "/metrics").text
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a metric family appears twice"
    # memory counts the engine processes, where the weights and the KV caches live
    server_only = int(open(f"/proc/{server.proc.pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert server.metric("pcgpt_process_resident_memory_bytes") > server_only


def sse(lines):
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def test_a_killed_engine_process_fails_its_requests_and_readiness(server):
    body = {"model": BASE, "prompt": "ROMEO:", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/ready").json()["status"] == "ready"
        victim = _engine_of(server, BASE)
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = sse(r.iter_lines())
            assert next(events)["choices"]  # the stream is running
            os.kill(victim, signal.SIGKILL)
            rest = list(events)  # ends: no hang
        errors = [e for e in rest if isinstance(e, dict) and "error" in e]
        assert errors and "engine failure" in errors[0]["error"]["message"], rest[-3:]
        assert rest[-1] == "[DONE]"
        assert wait_for(lambda: c.get("/ready").status_code == 503, 30)
        status = c.get("/ready").json()
        assert status["models"][BASE].startswith("dead: engine process exited (code -9)"), status
        assert status["models"][PCM] == "running"
        refused = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
        served = c.post("/v1/completions", json={"model": PCM, "prompt": "x", "max_tokens": 2})
        assert served.status_code == 200, served.text  # the other model's engine is untouched
        assert c.get("/metrics").status_code == 200  # a scrape still answers


def _engine_of(server: Server, model: str) -> int:
    """The engine process that serves `model`: its command line holds nothing model-specific, so
    find the one whose CPU time moves while that model generates."""
    def cpu(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    pids = engine_pids(server)
    before = {p: cpu(p) for p in pids}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": "ROMEO:", "max_tokens": 200, "ignore_eos": True})
        assert r.status_code == 200, r.text
    return max(pids, key=lambda p: cpu(p) - before[p])


def test_engine_processes_end_with_the_server(tmp_path):
    with Server({BASE: BASELINE}, log_path=tmp_path / "a.log") as s:
        (engine,) = engine_pids(s)
        assert s.terminate(timeout=30) == 0
        assert wait_for(lambda: not alive(engine), 30), "the engine outlived a SIGTERM'd server"
    with Server({BASE: BASELINE}, log_path=tmp_path / "b.log") as s:
        (engine,) = engine_pids(s)
        s.proc.kill()  # no chance to clean up: the engine sees its pipe close
        s.proc.wait(10)
        assert wait_for(lambda: not alive(engine), 30), "the engine outlived a killed server"
