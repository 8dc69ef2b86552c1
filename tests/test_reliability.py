"""Overload, disconnects, soak and faults against real `pcgpt serve` processes (loopback), with the
functions of bench/reliability.py at small sizes; RELIABILITY.md has full-size runs and their figures.
The tests check outcomes (counts, statuses, texts, gauges), never how fast they came; waits are
hang guards.

Each run returns its figures and a list of problems: empty means every promise held. Every run is
bounded in requests and time.
"""

import httpx
import pytest

from bench import reliability as rel

pytestmark = [pytest.mark.timeout(180), pytest.mark.server]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return rel.snapshot_baseline(tmp_path_factory.mktemp("rel") / "base")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """--max-batch-size 4 --max-queue 8: 12 places, so 100 concurrent requests overload it."""
    with rel.serve(ckpt, tmp_path_factory.mktemp("log") / "server.log") as s:
        yield s


def show(name, figures):
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items() if k not in ("problems", "rss_samples")))


def test_overload_refuses_the_excess_at_once_and_loses_nothing(server):
    figures = rel.run_overload(server, requests=100, waves=2, max_tokens=64, max_429_p95_s=None)
    show("overload", figures)
    assert figures["problems"] == []
    assert figures["accepted"] >= 2 * (rel.BATCH + rel.QUEUE) and figures["rejected_429"] >= 100
    assert figures["accepted"] + figures["rejected_429"] == 200 and figures["lost"] == 0


def test_cut_streams_free_everything(server):
    figures = rel.run_disconnects(server, streams=40, concurrency=rel.BATCH + rel.QUEUE)
    show("disconnects", figures)
    assert figures["problems"] == []
    # every request was cut, finished before its cut, or refused at once; a loaded machine shifts
    # the mix (more 429s), so the test needs only that cuts happened in numbers
    assert figures["cut_total"] + figures["finished_before_cut"] + figures["rejected_429"] == 40
    assert figures["cut_total"] >= 15
    assert figures["gauges_after"] == {"running": 0, "waiting": 0, "kv_usage": 0}


def test_soak_short(server):
    figures = rel.run_soak(server, requests=400, concurrency=6)
    show("soak", figures)
    assert figures["problems"] == []
    assert figures["ok"] == 400 and figures["rss_growth_after_warmup_mb"] <= rel.LEAK_MB


def test_fault_injection_is_off_by_default(server):
    """Without PCGPT_FAULT_INJECTION=1 the `user` values of the test hook are ordinary strings."""
    for user in ("fault:request", "fault:engine"):
        r = httpx.post(server.url + "/v1/completions", json=rel.greedy("ROMEO:", 4, user=user), timeout=30)
        assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200


def test_truncated_and_misshapen_checkpoints_fail_at_start(ckpt, tmp_path):
    figures = rel.run_bad_checkpoints(ckpt, tmp_path, kinds=("truncated", "shape"))
    show("bad checkpoints", figures)
    assert figures["problems"] == []
    assert [c["case"] for c in figures["cases"]] == ["truncated safetensors", "wrong tensor shape"]
    assert all(c["exit_code"] == 2 and c["message"].startswith("pcgpt serve: error: ") for c in figures["cases"])
    assert "has shape" in figures["cases"][1]["message"]


def test_a_failing_request_fails_alone_and_a_dead_engine_is_not_ready(ckpt, tmp_path):
    with rel.serve(ckpt, tmp_path / "faults.log", True, *rel.FAULTS_SERVER_ARGS) as s:
        figures = rel.run_request_faults(s)
        show("request faults", figures)
        assert figures["problems"] == []
        assert figures["normal_ok"] == 4 and figures["faulty_failed_cleanly"] == 2
        assert figures["generation_errors_counted"] == 2
        assert figures["ready_after_engine_death"]["status"] == 503
        assert figures["health_after_engine_death"] == 200
        log = (tmp_path / "faults.log").read_text()
        assert "test-only fault injection is on" in log
        assert "engine shakespeare-char died" in log  # logged as the server fault it is
