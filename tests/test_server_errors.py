"""Every invalid request gets its 4xx in OpenAI's error shape, never a 500; limits, auth,
back-pressure, cancellation and shutdown behave (real `pcgpt serve` processes on loopback).

Every wait below is bounded in count and in time, so a regression fails instead of hanging; no
test asserts how fast anything answers (timing belongs in bench/).
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.serving import PCGPT, Server, free_port, snapshot_baseline

pytestmark = [pytest.mark.timeout(180), pytest.mark.server]
# Waits and client timeouts are hang guards, not speed claims: long enough for a loaded machine,
# short enough that a hang fails the test.
HANG_GUARD_S = 60

BASE = "shakespeare-char"
PCM = "shakespeare-char-pc"
CONTEXT = 256


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A private copy of the baseline (the shipped one may be rewritten while we run) and a PC
    model built over it."""
    import torch
    from pcgpt.model.checkpoint import load_checkpoint, save_pcgpt
    from pcgpt.model.pc import PCGPT as PCModel

    root = tmp_path_factory.mktemp("ckpts")
    base_dir = snapshot_baseline(root / "base")
    base, tokenizer, _ = load_checkpoint(base_dir)
    torch.manual_seed(0)
    pc = PCModel.from_baseline(base)
    save_pcgpt(root / "pc", pc, tokenizer, {"sampler": {"tau": 2.2}})
    return {BASE: base_dir, PCM: root / "pc"}


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory):
    with Server(ckpts, log_path=tmp_path_factory.mktemp("log") / "main.log") as s:
        yield s
        assert_clean_log(s)


@pytest.fixture(scope="module")
def limited(ckpts, tmp_path_factory):
    """One slot and one queue place per model, and a small body limit."""
    with Server(ckpts, "--max-batch-size", "1", "--max-queue", "1", "--max-body-bytes", "4096",
                log_path=tmp_path_factory.mktemp("log") / "limited.log") as s:
        yield s
        assert_clean_log(s)


# --- helpers --------------------------------------------------------------------------------------

def assert_clean_log(s: Server) -> None:
    """No request of the module made the server answer 500 or log a traceback."""
    log = Path(s.log_path).read_text()
    assert "Traceback" not in log and '" 500' not in log, log[-4000:]
    assert s.metric("pcgpt_request_errors_total", {"type": "server_error"}) == 0


def assert_error(r: httpx.Response, status: int, param="<any>", code="<any>", type_=None, contains=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if param != "<any>":
        assert err["param"] == param, err
    if code != "<any>":
        assert err["code"] == code, err
    if type_ is not None:
        assert err["type"] == type_, err
    if contains is not None:
        assert contains.lower() in err["message"].lower(), err
    return err


def completion(**kw) -> dict:
    return {"model": BASE, "prompt": "ROMEO:", "max_tokens": 4, **kw}


def chat(**kw) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **kw}


def sse_events(lines, limit: int = 1000):
    """Parsed `data:` payloads of an SSE stream (bounded); '[DONE]' stays a string."""
    for n, line in enumerate(lines):
        assert n < 4 * limit, "stream too long"
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield data if data == "[DONE]" else json.loads(data)


def wait_for(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --- 400: validation --------------------------------------------------------------------------------

COMPLETION_400 = [
    # (id, body, param, message fragment)
    ("prompt-wrong-type", completion(prompt=123), "prompt", None),
    ("prompt-dict", completion(prompt={"a": 1}), "prompt", None),
    ("max_tokens-string", completion(max_tokens="many"), "max_tokens", None),
    ("temperature-string", completion(temperature="hot"), "temperature", None),
    ("stream-not-bool", completion(stream="maybe"), "stream", None),
    ("model-wrong-type", completion(model=7), "model", None),
    ("missing-prompt", {"model": BASE}, "prompt", "required"),
    ("missing-model", {"prompt": "x"}, "model", "required"),
    ("unknown-field", completion(frobnicate=1), "frobnicate", None),
    ("unknown-stream-option", completion(stream=True, stream_options={"include_usage": True, "x": 1}),
     "stream_options.x", None),
    ("temperature-negative", completion(temperature=-1), "temperature", None),
    ("temperature-3", completion(temperature=3), "temperature", None),
    ("top_p-0", completion(top_p=0), "top_p", None),
    ("n-0", completion(n=0), "n", None),
    ("n-17", completion(n=17), "n", None),
    ("logprobs-21", completion(logprobs=21), "logprobs", None),
    ("max_tokens-negative", completion(max_tokens=-1), "max_tokens", None),
    ("max_tokens-0-without-echo", completion(max_tokens=0), "max_tokens", "echo"),
    ("max_tokens-over-context", completion(max_tokens=300), "max_tokens", None),
    ("temperature-1e308", completion(temperature=1e308), "temperature", None),
    ("max_tokens-2**70", completion(max_tokens=2 ** 70), "max_tokens", None),
    ("seed-2**70", completion(seed=2 ** 70), "seed", None),
    ("top_k-2**70", completion(top_k=2 ** 70), "top_k", None),
    ("presence_penalty-huge", completion(presence_penalty=1e308), "presence_penalty", None),
    ("empty-prompt", completion(prompt=""), "prompt", "empty"),
    ("empty-prompt-list", completion(prompt=[]), "prompt", "empty"),
    ("empty-token-list", completion(prompt=[[]]), "prompt", "empty"),
    ("empty-stop", completion(stop=[""]), "stop", "empty"),
    ("empty-stop-string", completion(stop=""), "stop", "empty"),
    ("17-stops", completion(stop=[f"s{i}" for i in range(17)]), "stop", "16"),
    ("prompt-outside-vocab", completion(prompt="日本"), "prompt", "tokenized"),
    ("token-ids-outside-vocab", completion(prompt=[1, 2, 100000]), "prompt", "vocabulary"),
    ("negative-token-id", completion(prompt=[1, -1]), "prompt", "vocabulary"),
    ("mirostat-with-standard", completion(mirostat_tau=3.0), "sampler", "error_driven"),
    ("error-driven-greedy", completion(sampler="error_driven", temperature=0), "temperature", None),
    ("settle_steps-17", completion(model=PCM, settle_steps=17), "settle_steps", None),
    ("settle_steps-on-baseline", completion(settle_steps=2), "settle_steps", "baseline"),
    ("sampler-foo", completion(sampler="foo"), "sampler", None),
    ("logit_bias", completion(logit_bias={"5": 10.0}), "logit_bias", "not supported"),
    ("suffix", completion(suffix="the end"), "suffix", "not supported"),
    ("best_of-not-n", completion(best_of=3), "best_of", None),
    ("too-many-choices", completion(prompt=["a"] * 6, n=16), "prompt", None),
    ("truncate-0", completion(truncate_prompt_tokens=0), "truncate_prompt_tokens", None),
]


@pytest.mark.parametrize("body,param,fragment", [c[1:] for c in COMPLETION_400], ids=[c[0] for c in COMPLETION_400])
def test_completion_400(server, body, param, fragment):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=HANG_GUARD_S)
    assert_error(r, 400, param=param, type_="invalid_request_error", contains=fragment)


CHAT_400 = [
    ("missing-messages", {"model": BASE}, "messages", "required"),
    ("missing-model", {"messages": [{"role": "user", "content": "hi"}]}, "model", "required"),
    ("empty-messages", chat(messages=[]), "messages", None),
    ("messages-not-list", chat(messages="hi"), "messages", None),
    ("bad-role", chat(messages=[{"role": "tool", "content": "hi"}]), "messages.0.role", None),
    ("content-wrong-type", chat(messages=[{"role": "user", "content": 5}]), "messages.0.content", None),
    ("unknown-field", chat(prompt="x"), "prompt", None),
    ("top_logprobs-without-logprobs", chat(top_logprobs=3), "top_logprobs", "logprobs"),
    ("top_logprobs-21", chat(logprobs=True, top_logprobs=21), "top_logprobs", None),
    ("max_tokens-0", chat(max_tokens=0), "max_tokens", None),
    ("max_tokens-negative", chat(max_tokens=-5), "max_tokens", None),
    ("max_completion_tokens-0", chat(max_completion_tokens=0), "max_completion_tokens", None),
    ("temperature-3", chat(temperature=3), "temperature", None),
    ("n-0", chat(n=0), "n", None),
    ("stop-17", chat(stop=["x"] * 17), "stop", None),
    ("message-outside-vocab", chat(messages=[{"role": "user", "content": "日本"}]), "messages", "tokenized"),
    ("context-exceeded", chat(messages=[{"role": "user", "content": "a" * 240}], max_tokens=50), "messages", None),
    ("logit_bias", chat(logit_bias={"5": 1.0}), "logit_bias", None),
    ("settle_steps-on-baseline", chat(settle_steps=2), "settle_steps", None),
    ("mirostat-with-standard", chat(mirostat_eta=0.5), "sampler", None),
]


@pytest.mark.parametrize("body,param,fragment", [c[1:] for c in CHAT_400], ids=[c[0] for c in CHAT_400])
def test_chat_400(server, body, param, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=HANG_GUARD_S)
    assert_error(r, 400, param=param, type_="invalid_request_error", contains=fragment)


RAW_400 = [
    # (id, raw body, content type, param)
    ("nan-literal", b'{"model": "%s", "prompt": "a", "temperature": NaN}', "application/json", "temperature"),
    ("infinity-literal", b'{"model": "%s", "prompt": "a", "top_p": Infinity}', "application/json", "top_p"),
    ("neg-infinity-literal", b'{"model": "%s", "prompt": "a", "min_p": -Infinity}', "application/json", "min_p"),
    ("1e400", b'{"model": "%s", "prompt": "a", "temperature": 1e400}', "application/json", "temperature"),
    ("nan-int-field", b'{"model": "%s", "prompt": "a", "max_tokens": NaN}', "application/json", "max_tokens"),
    ("malformed-json", b'{"model": "%s", "prompt": ', "application/json", None),
    ("trailing-garbage", b'{"model": "%s", "prompt": "a"} xyz', "application/json", None),
    ("json-list", b'["%s", 1, 2]', "application/json", "<any>"),
    ("json-string", b'"%s"', "application/json", "<any>"),
    ("json-number", b'42', "application/json", "<any>"),
    ("json-null", b'null', "application/json", "<any>"),
    ("empty-body", b'', "application/json", "<any>"),
    ("text-plain", b'{"model": "%s", "prompt": "a"}', "text/plain", "<any>"),
    ("form-encoded", b'model=%s&prompt=a', "application/x-www-form-urlencoded", "<any>"),
    ("invalid-utf8", b'{"model": "%s", "prompt": "\xff\xfe\xc3("}', "application/json", "<any>"),
    ("invalid-utf8-key", b'{"model": "%s", "\xff": 1, "prompt": "a"}', "application/json", "<any>"),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("raw,ctype,param", [c[1:] for c in RAW_400], ids=[c[0] for c in RAW_400])
def test_raw_body_400(server, route, raw, ctype, param):
    raw = raw.replace(b"%s", BASE.encode())
    if route == "/v1/chat/completions":
        raw = raw.replace(b'"prompt": "a"', b'"messages": [{"role": "user", "content": "a"}]')
    r = httpx.post(server.url + route, content=raw, headers={"Content-Type": ctype}, timeout=HANG_GUARD_S)
    assert_error(r, 400, param=param, type_="invalid_request_error")


def test_context_length_exceeded_and_truncation(server):
    url = server.url + "/v1/completions"
    long_prompt = "To be, or not to be, that is the question. " * 6  # 264 characters
    r = httpx.post(url, json=completion(prompt=long_prompt[:250], max_tokens=16), timeout=HANG_GUARD_S)
    err = assert_error(r, 400, param="prompt", code="context_length_exceeded")
    assert "250" in err["message"] and "256" in err["message"], err
    r = httpx.post(url, json=completion(prompt=long_prompt, max_tokens=1), timeout=HANG_GUARD_S)  # the prompt alone
    assert_error(r, 400, param="prompt", code="context_length_exceeded")
    r = httpx.post(url, json=completion(prompt=list(range(1, 60)) * 5, max_tokens=1), timeout=HANG_GUARD_S)  # token ids
    assert_error(r, 400, param="prompt", code="context_length_exceeded")
    # truncate_prompt_tokens keeps the prompt's end and makes room for max_tokens
    r = httpx.post(url, json=completion(prompt=long_prompt, max_tokens=16, truncate_prompt_tokens=250), timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == CONTEXT - 16
    assert body["usage"]["completion_tokens"] <= 16
    r = httpx.post(url, json=completion(prompt=long_prompt, max_tokens=4, truncate_prompt_tokens=10), timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 10


def test_echo_with_zero_max_tokens_scores_the_prompt(server):
    r = httpx.post(server.url + "/v1/completions",
                   json=completion(prompt="ROMEO:", max_tokens=0, echo=True, logprobs=2), timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "ROMEO:"
    assert choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == list("ROMEO:")
    assert lp["token_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    assert lp["text_offset"] == list(range(6))
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6}


def test_boundary_values_are_accepted(server):
    """The edges of each range are valid: no off-by-one turns a good request into a 400."""
    url = server.url + "/v1/completions"
    for body in (completion(temperature=0), completion(temperature=2), completion(top_p=1e-9), completion(n=2),
                 completion(logprobs=20), completion(stop=[f"{i}#" for i in range(16)]),
                 completion(prompt="a" * (CONTEXT - 4), max_tokens=4), completion(model=PCM, settle_steps=16, max_tokens=1),
                 completion(settle_steps=0), completion(seed=2 ** 64 - 1), completion(prompt=[[1, 2], [3]])):
        r = httpx.post(url, json=body, timeout=HANG_GUARD_S)
        assert r.status_code == 200, (body, r.text)
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(logprobs=True, top_logprobs=20), timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text


# --- 404 / 405 -----------------------------------------------------------------------------------

def test_unknown_model_404(server):
    for route, body in (("/v1/completions", completion(model="gpt-4")), ("/v1/chat/completions", chat(model="gpt-4"))):
        r = httpx.post(server.url + route, json=body, timeout=HANG_GUARD_S)
        err = assert_error(r, 404, param="model", code="model_not_found")
        assert "gpt-4" in err["message"]
        # the stream flag does not change that: the error comes before any stream starts
        r = httpx.post(server.url + route, json={**body, "stream": True}, timeout=HANG_GUARD_S)
        assert_error(r, 404, param="model", code="model_not_found")
    r = httpx.get(server.url + "/v1/models/gpt-4", timeout=HANG_GUARD_S)
    assert_error(r, 404, param="model", code="model_not_found")


def test_unknown_route_and_method(server):
    for path in ("/v1/nothing", "/v2/completions", "/v1/completions/extra", "/nothing"):
        r = httpx.get(server.url + path, timeout=HANG_GUARD_S)
        assert_error(r, 404)
        r = httpx.post(server.url + path, json={}, timeout=HANG_GUARD_S)
        assert_error(r, 404)
    r = httpx.get(server.url + "/v1/completions", timeout=HANG_GUARD_S)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)
    r = httpx.delete(server.url + "/v1/models", timeout=HANG_GUARD_S)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)


def test_no_500_was_counted(server):
    text = httpx.get(server.url + "/metrics", timeout=HANG_GUARD_S).text
    assert server.metric("pcgpt_request_errors_total", {"type": "server_error"}) == 0, text


# --- readiness ---------------------------------------------------------------------------------

def test_ready_reports_both_engines_running(server):
    r = httpx.get(server.url + "/ready", timeout=HANG_GUARD_S)
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "models": {BASE: "running", PCM: "running"}}
    assert httpx.get(server.url + "/health", timeout=HANG_GUARD_S).json() == {"status": "ok"}


# --- 413 ---------------------------------------------------------------------------------------

def test_body_too_large_413(limited):
    url = limited.url + "/v1/completions"
    big = completion(prompt="a" * 5000)
    r = httpx.post(url, json=big, timeout=HANG_GUARD_S)  # with Content-Length
    assert_error(r, 413, code="request_too_large", contains="4096")

    def chunks():  # no Content-Length: chunked transfer encoding
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    with httpx.Client(timeout=HANG_GUARD_S) as client:
        try:
            r = client.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        except httpx.WriteError:  # the server may answer and close before the client sent it all
            pytest.fail("the server closed the connection without a 413 answer")
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert_error(r, 413, code="request_too_large")

    def small_chunks():
        data = json.dumps(completion(max_tokens=2)).encode()
        for i in range(0, len(data), 10):
            yield data[i:i + 10]

    # a body under the limit still works, chunked or not
    r = httpx.post(url, content=small_chunks(), headers={"Content-Type": "application/json"}, timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text
    r = httpx.post(url, json=completion(prompt="a" * 3000, max_tokens=1), timeout=HANG_GUARD_S)  # 400 (context), not 413
    assert_error(r, 400, code="context_length_exceeded")


# --- 429, /health under load, cancellation --------------------------------------------------------

def _open_stream(client, body):
    cm = client.stream("POST", "/v1/completions", json={**body, "stream": True})
    response = cm.__enter__()
    assert response.status_code == 200, response.read()
    return cm, response


# Requests that hold their slot for the length of a test: the most tokens and settle steps the
# PC model takes, so that even a fast machine is still generating them when the test looks.
LONG = {"model": PCM, "prompt": "ROMEO:", "max_tokens": CONTEXT - 16, "ignore_eos": True, "settle_steps": 16}


def test_queue_full_429_and_health_under_load(limited):
    long_ = LONG
    with httpx.Client(base_url=limited.url, timeout=HANG_GUARD_S) as c1, \
            httpx.Client(base_url=limited.url, timeout=HANG_GUARD_S) as c2:
        cm1, s1 = _open_stream(c1, long_)  # takes the one slot
        lines1 = s1.iter_lines()
        first = next(e for e in sse_events(lines1) if e != "[DONE]")
        assert first["choices"][0]["finish_reason"] is None
        cm2, s2 = _open_stream(c2, {**long_, "settle_steps": 0})  # takes the one queue place
        try:
            # refused, not queued: the answer comes while both long requests still hold their places
            r = httpx.post(limited.url + "/v1/completions", json=completion(model=PCM), timeout=HANG_GUARD_S)
            assert_error(r, 429, type_="rate_limit_error", code="queue_full")
            r = httpx.post(limited.url + "/v1/chat/completions", json=chat(model=PCM, stream=True), timeout=HANG_GUARD_S)
            assert_error(r, 429, type_="rate_limit_error")
            # the other model has its own engine and queue
            assert httpx.post(limited.url + "/v1/completions", json=completion(), timeout=HANG_GUARD_S).status_code == 200
            # /health answers while the batch is busy: the long requests still run and wait afterwards
            for _ in range(5):
                assert httpx.get(limited.url + "/health", timeout=HANG_GUARD_S).status_code == 200
            assert limited.metric("pcgpt_num_requests_running", {"model": PCM}) == 1
            assert limited.metric("pcgpt_num_requests_waiting", {"model": PCM}) == 1
            # both long requests still finish in full
            for lines in (lines1, s2.iter_lines()):
                events = list(sse_events(lines))
                assert events[-1] == "[DONE]"
                assert events[-2]["choices"][0]["finish_reason"] == "length"
        finally:
            cm2.__exit__(None, None, None)
            cm1.__exit__(None, None, None)
    # afterwards the queue takes requests again
    r = httpx.post(limited.url + "/v1/completions", json=completion(model=PCM), timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text


def test_disconnected_stream_frees_its_slot(limited):
    cancelled = {"model": PCM, "finish_reason": "cancelled"}
    finished = {"model": PCM, "finish_reason": "length"}
    before = limited.metric("pcgpt_requests_total", cancelled), limited.metric("pcgpt_requests_total", finished)
    body = LONG
    with httpx.Client(base_url=limited.url, timeout=HANG_GUARD_S) as client:
        cm, s = _open_stream(client, body)
        events = sse_events(s.iter_lines())
        for _ in range(2):
            assert next(events) != "[DONE]"
        assert limited.metric("pcgpt_num_requests_running", {"model": PCM}) == 1
        cm.__exit__(None, None, None)  # the client goes away mid-stream
    # the slot is freed by cancelling the request, not by its running to the end
    assert wait_for(lambda: limited.metric("pcgpt_num_requests_running", {"model": PCM}) == 0, HANG_GUARD_S)
    assert wait_for(lambda: limited.metric("pcgpt_requests_total", cancelled) == before[0] + 1, HANG_GUARD_S)
    assert limited.metric("pcgpt_requests_total", finished) == before[1]
    # the freed slot admits a new request
    r = httpx.post(limited.url + "/v1/completions", json=completion(model=PCM, max_tokens=2), timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text


def test_client_timeout_cancels_a_non_streamed_request(limited):
    cancelled = {"model": PCM, "finish_reason": "cancelled"}
    finished = {"model": PCM, "finish_reason": "length"}
    before = limited.metric("pcgpt_requests_total", cancelled), limited.metric("pcgpt_requests_total", finished)
    body = LONG
    with pytest.raises(httpx.TimeoutException):
        httpx.post(limited.url + "/v1/completions", json=body, timeout=0.5)
    # cancelled when the client left, not run to its end
    assert wait_for(lambda: limited.metric("pcgpt_requests_total", cancelled) == before[0] + 1, HANG_GUARD_S)
    assert wait_for(lambda: limited.metric("pcgpt_num_requests_running", {"model": PCM}) == 0, HANG_GUARD_S)
    assert limited.metric("pcgpt_requests_total", finished) == before[1]
    r = httpx.post(limited.url + "/v1/completions", json=completion(model=PCM, max_tokens=2), timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text


# --- 401 -----------------------------------------------------------------------------------------

def test_api_key(ckpts, tmp_path):
    with Server({BASE: ckpts[BASE]}, "--api-key", "secret", log_path=tmp_path / "auth.log") as s:
        calls = [("POST", "/v1/completions", completion(max_tokens=1)), ("POST", "/v1/chat/completions", chat(max_tokens=1)),
                 ("GET", "/v1/models", None), ("GET", f"/v1/models/{BASE}", None)]
        bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer secretx"},
                       {"Authorization": "Bearer"}, {"Authorization": "Basic secret"}, {"Authorization": "secret"},
                       {"Authorization": "Token secret"}, {"X-API-Key": "secret"}]
        with httpx.Client(base_url=s.url, timeout=HANG_GUARD_S) as client:
            for method, path, body in calls:
                for headers in bad_headers:
                    r = client.request(method, path, json=body, headers=headers)
                    assert_error(r, 401, code="invalid_api_key", type_="invalid_request_error")
                    assert "secret" not in r.text
                r = client.request(method, path, json=body, headers={"Authorization": "Bearer secret"})
                assert r.status_code == 200, (path, r.text)
                r = client.request(method, path, json=body, headers={"Authorization": "bearer secret"})
                assert r.status_code == 200, (path, r.text)
            # an invalid body without a key is a 401, not a validation answer
            r = client.post("/v1/completions", json={"nonsense": True})
            assert_error(r, 401, code="invalid_api_key")
            # open routes stay open
            assert client.get("/health").status_code == 200
            assert client.get("/ready").status_code == 200
            assert client.get("/metrics").status_code == 200

        import openai
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0, timeout=HANG_GUARD_S)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="secret", max_retries=0, timeout=HANG_GUARD_S)
        assert [m.id for m in good.models.list().data] == [BASE]


# --- SIGTERM drains -------------------------------------------------------------------------------

def test_sigterm_drains_the_running_stream_and_exits_0(ckpts, tmp_path):
    s = Server({PCM: ckpts[PCM]}, log_path=tmp_path / "term.log")
    with s:
        body = {"model": PCM, "prompt": "ROMEO:", "max_tokens": 150, "ignore_eos": True, "settle_steps": 2,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=s.url, timeout=HANG_GUARD_S) as client, client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
            got = [next(events) for _ in range(3)]
            s.proc.send_signal(15)  # SIGTERM mid-stream
            # while the running request drains, the server still listens: /ready is 503 at once (a
            # balancer stops routing here) and a new request gets 503 in OpenAI's shape
            with httpx.Client(base_url=s.url, timeout=HANG_GUARD_S) as other:
                assert other.get("/ready").status_code == 503
                new = other.post("/v1/completions", json={"model": PCM, "prompt": "x", "max_tokens": 2})
                assert new.status_code == 503 and new.json()["error"]["code"] == "model_unavailable", new.text
            got += list(events)  # the running stream goes on to its end (checked below)
        assert got[-1] == "[DONE]"
        chunks = [e for e in got[:-1] if e["choices"]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        usage = got[-2]["usage"]
        assert usage["completion_tokens"] == 150, usage
        assert len(text) == 150  # char model: one character per token
        code = s.terminate(timeout=HANG_GUARD_S) if s.proc.poll() is None else s.proc.wait(timeout=HANG_GUARD_S)
        assert code == 0, s.read_log()
    assert "Traceback" not in s.read_log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)


# --- bad checkpoints ----------------------------------------------------------------------------

def test_bad_checkpoint_exits_nonzero_naming_the_file(ckpts, tmp_path):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    shutil.copy(ckpts[BASE] / "config.json", truncated / "config.json")
    (truncated / "model.safetensors").write_bytes((ckpts[BASE] / "model.safetensors").read_bytes()[:1000])
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    shutil.copy(ckpts[BASE] / "model.safetensors", bad_json / "model.safetensors")
    (bad_json / "config.json").write_text('{"format": ')
    cases = [(tmp_path / "does-not-exist", "does-not-exist"), (truncated, "model.safetensors"),
             (bad_json, "config.json")]
    for path, name in cases:
        p = subprocess.run([PCGPT, "serve", "--model", f"x={path}", "--port", str(free_port())],
                           capture_output=True, text=True, timeout=60)
        out = p.stdout + p.stderr
        assert p.returncode != 0, out
        assert str(path) in out and name in out, out
        assert "Traceback" not in out, out
