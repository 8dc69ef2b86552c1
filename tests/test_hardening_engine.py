"""A hung or dead engine against one real `pcgpt serve` (two models, a 1 s watchdog, a restart after
0.2 s backoff, at most 1 in a row): the event loop never blocks on a stopped engine's pipe, a hung
engine is detected, failed and restarted while the other model serves, a request whose engine dies
gets an OpenAI-shaped 503, a dead engine's gauges read 0 with pcgpt_engine_up 0, and /health fails
only once an engine has used up its restarts (liveness), where /ready fails while any is down.

The tests run in order on one server: the first uses the one restart allowed, so the second
death is the one past the limit. Waits are hang guards; no test asserts how fast anything was.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serving import BASELINE, PC, ROOT, Server
from test_engine_process import engine_pids, sse, wait_for

pytestmark = [pytest.mark.server, pytest.mark.timeout(240)]

BASE, PCM = "shakespeare-char", "shakespeare-char-pc"
WATCHDOG_S = 1.0
MAX_RESTARTS = 1
GUARD_S = 60  # hang guard for a restart (a loaded machine loads the model in a few seconds)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    with Server({BASE: BASELINE, PCM: PC}, "--max-batch-size", "4", "--max-queue", "124",
                "--engine-watchdog-seconds", str(WATCHDOG_S), "--engine-restart-backoff", "0.2",
                "--max-engine-restarts", str(MAX_RESTARTS), log_path=log) as s:
        yield s
        s.proc.kill()  # no drain to wait for (its engines exit when their pipes close)
        s.proc.wait()


def log_text(server) -> str:
    return server.log_path.read_text()


def base_engine(server) -> int:
    """The baseline's engine process now, as the server logs each one it starts."""
    pid = int(re.findall(rf"engine {BASE}: process (\d+) started", log_text(server))[-1])
    assert pid in engine_pids(server)
    return pid


def container_healthchecks() -> list[list[str]]:
    """The commands of the image's HEALTHCHECK and of docker-compose.yml's pcgpt healthcheck."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    image = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", dockerfile, re.M | re.S).group(1))
    services = (ROOT / "docker-compose.yml").read_text()
    pcgpt_service = services[services.index("\n  pcgpt:"):]
    compose = json.loads(re.search(r"^ +test: (\[.*\])$", pcgpt_service, re.M).group(1))  # its first healthcheck
    assert compose[0] == "CMD"
    return [image, compose[1:]]


def healthcheck_passes(server, command: list[str]) -> bool:
    command = [sys.executable if c == "python" else c.replace(":8000/", f":{server.port}/") for c in command]
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


def ready(server) -> httpx.Response:
    return httpx.get(server.url + "/ready", timeout=10)


def is_openai_error(response, status: int, code: str) -> bool:
    body = response.json()
    return (response.status_code == status and set(body) == {"error"}
            and set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code)


def test_a_stopped_engine_blocks_nothing_is_detected_failed_and_restarted(server):
    """SIGSTOP on an idle engine: it neither reads its pipe nor steps. 120 requests with 16 long
    stop strings each (~0.5 MB of messages, more than a pipe holds) then must not stall the event
    loop: /health, /metrics and the other model answer. The watchdog (its clock starts with the first
    request) fails the requests with 503, a stream with an in-band error; /ready names the hung
    engine; the restarted engine serves again."""
    victim = base_engine(server)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()

    async def flood_and_probe():
        async with httpx.AsyncClient(base_url=server.url, timeout=GUARD_S, limits=httpx.Limits(max_connections=200)) as ac, \
                httpx.AsyncClient(base_url=server.url) as probe:
            async def stream():
                body = {"model": BASE, "prompt": "ROMEO:", "max_tokens": 240, "ignore_eos": True, "stream": True}
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    return r.status_code, [line async for line in r.aiter_lines()]

            streamed = asyncio.create_task(stream())
            flood = [asyncio.create_task(ac.post("/v1/completions", json={
                "model": BASE, "prompt": "ROMEO:", "max_tokens": 8,
                "stop": [f"{i:03d}{j:02d}" + "x" * 250 for j in range(16)]})) for i in range(120)]
            await asyncio.sleep(0.2)
            # hang guards: a loop blocked in a pipe send would answer neither, ever
            health = await probe.get("/health", timeout=10)
            scrape = await probe.get("/metrics", timeout=10)  # the stopped engine's metrics are not waited for
            other = await probe.post("/v1/completions", json={"model": PCM, "prompt": "ROMEO:", "max_tokens": 4},
                                     timeout=30)
            return health, scrape, other, await asyncio.gather(*flood), await streamed

    health, scrape, other, flooded, (stream_status, lines) = asyncio.run(flood_and_probe())
    assert health.status_code == 200, health.text
    assert scrape.status_code == 200
    assert re.search(rf'^pcgpt_engine_up{{model="{PCM}"[^}}]*}} 1\.0$', scrape.text, re.M), scrape.text
    assert other.status_code == 200, other.text
    statuses = [r.status_code for r in flooded]
    assert set(statuses) <= {200, 429, 503}, statuses  # never a 500, never a hang
    lost = [r for r in flooded if r.status_code == 503]
    assert lost and all(is_openai_error(r, 503, "model_unavailable") for r in lost), lost[0].text
    assert any("hung: no step for" in r.json()["error"]["message"] for r in lost)
    rest = list(sse(lines))  # the stream ends: an in-band error, then [DONE]
    errors = [e["error"] for e in rest if isinstance(e, dict) and "error" in e]
    assert stream_status == 200 and errors, rest[-3:]
    assert errors[0]["code"] == "model_unavailable" and "hung" in errors[0]["message"], errors
    assert rest[-1] == "[DONE]"
    # restarting: not ready, but alive (liveness holds while the server can recover by itself)
    assert "hung" in ready(server).json()["models"][BASE] or ready(server).status_code == 200
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert all(healthcheck_passes(server, check) for check in container_healthchecks())
    print(f"\nhung engine failed its requests {time.monotonic() - stopped_at:.1f} s after SIGSTOP "
          f"(watchdog {WATCHDOG_S} s)")
    assert wait_for(lambda: ready(server).status_code == 200, GUARD_S), ready(server).text
    print(f"restarted: /ready 200 {time.monotonic() - stopped_at:.1f} s after SIGSTOP")
    assert victim not in engine_pids(server)
    r = httpx.post(server.url + "/v1/completions", json={"model": BASE, "prompt": "ROMEO:", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
    assert f"engine {BASE}: hung: no step for" in log_text(server)


def test_a_dead_engine_past_its_restarts_fails_its_requests_with_503_zero_gauges_and_health(server):
    """SIGKILL mid-request, the second death in a row (the limit is 1 restart): the non-streamed
    request gets an OpenAI-shaped 503, the stream an in-band error; the model stays down, its
    gauges read 0 and pcgpt_engine_up 0, /health answers 503 naming it (a container healthcheck
    then restarts the server), and the other model keeps serving."""
    victim = base_engine(server)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/ready").status_code == 200
        assert server.metric("pcgpt_engine_up", {"model": BASE}) == 1
        assert server.metric("pcgpt_engine_restarts_total", {"model": BASE}) == 1  # the hung engine's

        async def killed_mid_request():
            async with httpx.AsyncClient(base_url=server.url, timeout=GUARD_S) as ac:
                body = {"model": BASE, "prompt": "ROMEO:", "max_tokens": 240, "ignore_eos": True}
                plain = asyncio.create_task(ac.post("/v1/completions", json=body))
                async with ac.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: "):
                            break  # the stream is running
                    # gauges the death must zero
                    while server.metric("pcgpt_num_requests_running", {"model": BASE}) < 2:
                        await asyncio.sleep(0.05)
                    assert server.metric("pcgpt_kv_cache_usage_ratio", {"model": BASE}) > 0
                    os.kill(victim, signal.SIGKILL)
                    rest = [line async for line in lines]
                return await plain, rest

        plain, rest = asyncio.run(killed_mid_request())
        assert is_openai_error(plain, 503, "model_unavailable"), plain.text
        assert "engine process exited (code -9)" in plain.json()["error"]["message"]
        errors = [e["error"] for e in sse(rest) if isinstance(e, dict) and "error" in e]
        assert errors and errors[0]["code"] == "model_unavailable", rest[-3:]
        assert wait_for(lambda: c.get("/health").status_code == 503, 10)
        health = c.get("/health").json()
        assert health["status"] == "failed" and set(health["models"]) == {BASE}, health
        assert "gave up after 1 restarts in a row" in health["models"][BASE], health
        status = c.get("/ready")
        assert status.status_code == 503 and status.json()["models"][PCM] == "running", status.text
        assert not any(healthcheck_passes(server, check) for check in container_healthchecks())
        assert server.metric("pcgpt_engine_up", {"model": BASE}) == 0
        assert server.metric("pcgpt_engine_up", {"model": PCM}) == 1
        for gauge in ("pcgpt_num_requests_running", "pcgpt_num_requests_waiting", "pcgpt_kv_cache_usage_ratio",
                      "pcgpt_kv_cache_bytes"):
            assert server.metric(gauge, {"model": BASE}) == 0, gauge
        assert server.metric("pcgpt_kv_cache_bytes", {"model": PCM}) > 0  # the live engine's are untouched
        refused = c.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2})
        assert is_openai_error(refused, 503, "model_unavailable"), refused.text
        served = c.post("/v1/completions", json={"model": PCM, "prompt": "x", "max_tokens": 2})
        assert served.status_code == 200, served.text


class _RunningProcess:
    """Stands in for an engine process that runs (the pipe is driven by the test instead)."""
    pid = 0
    exitcode = None

    def is_alive(self):
        return True

    def join(self, timeout=None):
        pass


@pytest.mark.timeout(60)
def test_a_message_written_in_parts_never_blocks_the_event_loop():
    """No server: a RemoteEngine on a real pipe whose other end the test writes by hand. An engine
    stopped half-way through a message leaves the loop free (its timers run) until the rest
    arrives; a message larger than the pipe holds arrives whole; the order of messages is kept."""
    import multiprocessing
    import pickle
    import struct
    import threading
    from pcgpt.model.checkpoint import read_checkpoint_info
    from pcgpt.serve.engine_process import RemoteEngine

    engine = RemoteEngine(BASE, read_checkpoint_info(BASELINE), device="cpu", dtype="float32", threads=1,
                          max_batch_size=4, max_queue=4, sampler_defaults={}, stream_interval=1)
    engine._conn, child = multiprocessing.Pipe()
    engine._proc = _RunningProcess()

    def frame(message) -> bytes:
        data = pickle.dumps(message)
        return struct.pack("!i", len(data)) + data

    heartbeat, big = frame(("heartbeat", 7)), frame(("events", [(999, "x" * 3_000_000)]))  # key 999: nobody's

    async def scenario():
        engine.attach()
        ticks = []
        loop = asyncio.get_running_loop()

        def tick():
            ticks.append(time.monotonic())
            loop.call_later(0.02, tick)

        tick()
        os.write(child.fileno(), heartbeat[:6])  # the header and two bytes of the pickle
        finish = threading.Timer(1.0, lambda: os.write(child.fileno(), heartbeat[6:]))
        finish.start()
        started = time.monotonic()
        while engine._steps != 7:
            await asyncio.sleep(0.01)
        ran_meanwhile = len([t for t in ticks if started < t < started + 0.9])
        # larger than the socket's buffers: written from a thread, as the engine would, while the loop reads
        writer = threading.Thread(target=lambda: (child.send_bytes(big[4:]), child.send(("heartbeat", 8))))
        writer.start()
        while engine._steps != 8:
            await asyncio.sleep(0.01)
        writer.join()
        engine._watch_timer.cancel()
        engine._disconnect()
        return ran_meanwhile

    ran_meanwhile = asyncio.run(scenario())
    assert ran_meanwhile >= 10, ran_meanwhile  # the loop kept running while half a message sat in the pipe
    child.close()
