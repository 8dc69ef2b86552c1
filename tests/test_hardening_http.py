"""Hostile connections and request-level leaks (issue 16), against a real `pcgpt serve`.

One server for the module, with small limits set by its flags, so each attack is bounded to a
second or so: header floods (bytes and count), requests that never finish their head or body,
idle keep-alive connections, more connections than the cap, a /metrics flood; then the request
checks: chat `n` beyond capacity, chat's default max_tokens after truncation, the API key before
the body, an empty key refused at start.

Socket timeouts are hang guards: a limit that does not act makes a read time out and the test fail.
"""

import concurrent.futures
import json
import socket
import subprocess
import sys

import httpx
import pytest

from tests.serving import BASELINE, Server, free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.server]

MODEL = "base"
KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_HEADER_BYTES, MAX_HEADERS, MAX_CONNECTIONS = 8192, 20, 8
HANG_GUARD_S = 15  # a limit of 1 s that has not acted by then does not act


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server({MODEL: BASELINE}, "--api-key", KEY, "--max-batch-size", "2", "--max-queue", "2",
                "--max-header-bytes", str(MAX_HEADER_BYTES), "--max-headers", str(MAX_HEADERS),
                "--header-timeout", "1", "--body-timeout", "1", "--keep-alive-timeout", "1",
                "--max-connections", str(MAX_CONNECTIONS), "--metrics-max-age", "60", "--drain-seconds", "1",
                log_path=tmp_path_factory.mktemp("log") / "hardening.log") as s:
        yield s
        assert "Traceback" not in s.read_log()


def connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD_S)
    s.settimeout(HANG_GUARD_S)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower(), head
    return status, json.loads(body)["error"]


def get(path: str, *headers: bytes) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: test\r\n" + b"".join(h + b"\r\n" for h in headers)


# --- connections --------------------------------------------------------------------------------

def test_request_headers_are_bounded_in_bytes_and_count(server):
    # a header value that never ends: answered once the head passes the limit, not buffered on
    # (one byte over and no more, so that nothing is left unread to turn the close into a reset)
    s = connect(server)
    start = get("/health") + b"X-Long: "
    s.sendall(start + b"a" * (MAX_HEADER_BYTES + 1 - len(start)))
    status, error = status_and_error(read_until_closed(s))
    assert status == 431 and error["code"] == "request_header_fields_too_large", error

    # many small fields, each well-formed
    s = connect(server)
    s.sendall(get("/health", *(b"X-F%d: 1" % i for i in range(MAX_HEADERS + 1))) + b"\r\n")
    status, error = status_and_error(read_until_closed(s))
    assert status == 431 and str(MAX_HEADERS) in error["message"], error

    # fields that fit get through, to an authenticated route
    fits = {f"X-F{i}": "v" * 100 for i in range(MAX_HEADERS - 8)}  # httpx adds a few
    r = httpx.get(server.url + "/v1/models", headers={**AUTH, **fits}, timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text


def test_requests_that_never_finish_are_timed_out(server):
    # a head that never ends (slowloris), a connection that sends nothing, a body that stops short
    stalled = {"head": get("/health", b"X-A: 1"), "nothing": b"",
               "body": b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + KEY.encode() +
                       b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": "}
    sockets = {}
    for what, data in stalled.items():
        sockets[what] = connect(server)
        sockets[what].sendall(data)
    for what, s in sockets.items():
        status, error = status_and_error(read_until_closed(s))
        assert status == 408 and error["code"] == "request_timeout", (what, error)

    # an idle keep-alive connection is closed after its answer (uvicorn's timeout_keep_alive)
    s = connect(server)
    s.sendall(get("/health") + b"\r\n")
    answer = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}'), answer


def test_connections_beyond_the_cap_are_refused_and_stalled_ones_freed(server):
    sockets = [connect(server) for _ in range(MAX_CONNECTIONS + 1)]  # all idle: each holds a place
    statuses = sorted(status_and_error(read_until_closed(s))[0] for s in sockets)
    # the ones beyond the cap at once (503), the others when their head's deadline passes (408)
    assert 503 in statuses and set(statuses) <= {408, 503}, statuses
    assert statuses.count(408) <= MAX_CONNECTIONS, statuses
    assert httpx.get(server.url + "/health", timeout=HANG_GUARD_S).status_code == 200


def test_a_metrics_flood_is_served_from_one_snapshot_and_a_finished_request_shows(server):
    def snapshots(text: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("pcgpt_metrics_snapshots_total")))

    def tokens(text: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("pcgpt_generation_tokens_total")))

    limits = httpx.Limits(max_connections=4)
    with httpx.Client(base_url=server.url, timeout=HANG_GUARD_S, limits=limits) as client:
        first = client.get("/metrics").text
        # below the connection cap: 4 scrapers at once, 40 scrapes
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            flood = list(pool.map(lambda _: client.get("/metrics"), range(40)))
        assert all(r.status_code == 200 for r in flood)
        assert {snapshots(r.text) for r in flood} == {snapshots(first)}, "a scrape collected from the engines again"

        r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 3})
        assert r.status_code == 200, r.text
        after = client.get("/metrics").text  # well within --metrics-max-age, yet fresh: a request ended
        assert snapshots(after) > snapshots(first) and tokens(after) == tokens(first) + 3


# --- requests -----------------------------------------------------------------------------------

def test_chat_n_beyond_capacity_is_a_400_as_for_completions(server):
    # capacity: 2 slots + 2 queue places; n=5 can never be held, on an idle server too
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(server.url + path, headers=AUTH, timeout=HANG_GUARD_S,
                       json={"model": MODEL, "n": 5, "max_tokens": 1, **body})
        assert r.status_code == 400, (path, r.text)
        assert "can queue" in r.json()["error"]["message"], r.text


def test_chat_default_max_tokens_counts_the_truncated_prompt(server):
    # ~400 tokens of chat truncated to 50: the default leaves room for 256 - 50 tokens
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "to be or not " * 30}],
                         "truncate_prompt_tokens": 50, "stop": ["never appears: \x01"], "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == 50, body["usage"]
    assert body["usage"]["completion_tokens"] == 256 - 50 and body["choices"][0]["finish_reason"] == "length", body


def test_the_api_key_is_checked_before_the_body(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(server.url + path, content=b"{not json", timeout=HANG_GUARD_S,
                           headers={"Content-Type": "application/json", **headers})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        r = httpx.post(server.url + path, content=b"{not json", timeout=HANG_GUARD_S,
                       headers={"Content-Type": "application/json", **AUTH})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_api_key_is_refused_at_start(how, monkeypatch, capsys):
    # in this process: `pcgpt serve`'s own entry point, refusing before it loads or listens
    from pcgpt.cli import main
    args = ["serve", "--port", str(free_port()), "--model", f"{MODEL}={BASELINE}"]
    if how == "flag":
        monkeypatch.delenv("PCGPT_API_KEY", raising=False)
        args += ["--api-key", ""]
    else:
        monkeypatch.setenv("PCGPT_API_KEY", "")
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0] and "empty" in lines[0], lines


def test_the_file_limit_makes_room_for_the_connection_cap():
    # past the soft limit on open files a connection fails at accept, unanswered: the cap must act first
    script = ("import resource; from pcgpt.serve.limits import FILES_BESIDES_CONNECTIONS, raise_file_limit; "
              "assert raise_file_limit(1024) is None; "
              "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1024 + FILES_BESIDES_CONNECTIONS")

    def low_soft_limit():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    done = subprocess.run([sys.executable, "-c", script], preexec_fn=low_soft_limit, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
