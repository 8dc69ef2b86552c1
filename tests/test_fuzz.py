"""Fuzzing a real `pcgpt serve` from its own OpenAPI document (schemathesis), plus hand-written
bad inputs that schema-driven generation does not produce (tests/test_server_errors.py has the
single 4xx cases; none is repeated here).

The server serves the shipped char model (a snapshot) and a tiny random GPT-2-vocabulary model, so
generated text reaches generation on the BPE model (any string tokenizes) and the char model's
vocabulary checks. Every generated request is checked by schemathesis: no 5xx, the status code,
content type, headers and body match what /openapi.json declares, and invalid data is refused.
"""

import json
import os
import random
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.serving import Server, snapshot_baseline

pytestmark = [pytest.mark.timeout(240), pytest.mark.server]

CHAR = "shakespeare-char"
BPE = "gpt2-tiny"
MODELS = [CHAR, BPE]
EXAMPLES_PER_OPERATION = int(os.environ.get("PCGPT_FUZZ_EXAMPLES", "350"))  # the operations without inputs stop early
MIN_REQUESTS = 1000
MAX_GENERATED_TOKENS = 6
# fields that valid-by-schema bodies get refused for (settle_steps on a baseline model, settle_threshold
# without settle_steps "auto", logit_bias,
# suffix, best_of != n, mirostat_* without sampler "error_driven", top_logprobs without logprobs)
SEMANTIC_TRAPS = ("settle_steps", "settle_threshold", "logit_bias", "suffix", "best_of", "mirostat_tau", "mirostat_eta", "precision_gain",
                  "top_logprobs")
SENT = {"requests": 0, "by_status": {}, "streams": {}}


# --- fixtures -------------------------------------------------------------------------------------

def make_gpt2_tiny(dst):
    """A tiny random model over GPT-2's BPE vocabulary (50257 tokens, <|endoftext|> = 50256)."""
    import torch
    from pcgpt.model.checkpoint import save_pcgpt
    from pcgpt.model.gpt import GPT, preset_config
    from pcgpt.model.tokenizer import gpt2_tokenizer
    torch.manual_seed(0)
    return save_pcgpt(dst, GPT(preset_config("tiny", vocab_size=50257)), gpt2_tokenizer())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    models = {CHAR: snapshot_baseline(root / "char"), BPE: make_gpt2_tiny(root / "bpe")}
    with Server(models, "--max-batch-size", "32", "--max-queue", "512", log_path=root / "server.log") as s:
        yield s


def openapi_document() -> dict:
    """The server's OpenAPI document, built in-process (it does not depend on the models loaded);
    the fixture checks that the real server publishes exactly this one."""
    from pcgpt.serve.config import ServerConfig
    from pcgpt.serve.server import create_app
    return create_app(ServerConfig(), {}).openapi()


OPENAPI = openapi_document()
schema = schemathesis.openapi.from_dict(OPENAPI)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@schema.hook
def map_case(ctx, case):
    """Valid bodies mostly name a served model (else nearly all would be 404) and ask for few
    tokens (the fuzzing is about the HTTP surface, not long generations)."""
    body = case.body
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(body, dict):
        return case
    rnd = random.Random(json.dumps(body, sort_keys=True, default=str))
    if rnd.random() < 0.9:
        body["model"] = rnd.choice(MODELS)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > MAX_GENERATED_TOKENS and rnd.random() < 0.95:
            body[key] = rnd.randint(1 if key == "max_completion_tokens" or "messages" in body else 0,
                                    MAX_GENERATED_TOKENS)
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = rnd.randint(1, MAX_GENERATED_TOKENS)
    if rnd.random() < 0.5:  # half without the fields most often refused for reasons a schema cannot state
        for key in SEMANTIC_TRAPS:
            body.pop(key, None)
    if "prompt" in body and rnd.random() < 0.5:  # half with a prompt both models can read
        body["prompt"] = _readable(body["prompt"])
    if rnd.random() < 0.35:  # random booleans rarely land on a stream; ask for more of them
        body["stream"] = True
    return case


def _readable(prompt):
    """Token ids folded into the char model's vocabulary (a subset of GPT-2's), nothing empty."""
    if isinstance(prompt, int):
        return abs(prompt) % 65
    if isinstance(prompt, list):
        return [_readable(p) for p in prompt] or "ROMEO:"
    return prompt or "ROMEO:"


def test_the_server_publishes_this_document(server):
    assert httpx.get(server.url + "/openapi.json", timeout=10).json() == OPENAPI


# --- schema fuzzing ----------------------------------------------------------------------------------

@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case, server):
    response = case.call(base_url=server.url, timeout=60)
    SENT["requests"] += 1
    SENT["by_status"][response.status_code] = SENT["by_status"].get(response.status_code, 0) + 1
    if response.status_code == 200 and "text/event-stream" in str(response.headers.get("content-type")):
        SENT["streams"][case.path] = SENT["streams"].get(case.path, 0) + 1
    # every built-in response check but one: "positive_data_acceptance" wants every schema-valid
    # body accepted, but the API refuses some with 400 on purpose for what a schema cannot say
    # (prompt + max_tokens over the context, an empty prompt, settle_steps on a baseline model, ...)
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


# --- hand-written bad input -----------------------------------------------------------------------

def post(server, route: str, raw: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(server.url + route, content=raw, headers={"Content-Type": content_type}, timeout=30)


def strict_json(r: httpx.Response):
    """The body as JSON, refusing the NaN / Infinity literals that strict JSON has not."""
    def refuse(name):
        raise AssertionError(f"non-JSON constant {name} in {r.text[:200]}")
    return json.loads(r.text, parse_constant=refuse)


def assert_400(r: httpx.Response, param: str | None = "<any>") -> dict:
    assert r.status_code == 400, (r.status_code, r.text)
    err = strict_json(r)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    if param != "<any>":
        assert err["param"] == param, err
    return err


C, CHAT = "/v1/completions", "/v1/chat/completions"
UNKNOWN_ONLY = ["\x00", "\x00\x01\x02", "😀😀😀", "\u200b", "\t\r\x0b", "ñé", "\u202e\u202d", "\ufeff", "€"]


@pytest.mark.parametrize("text", UNKNOWN_ONLY, ids=[t.encode("unicode_escape").decode() for t in UNKNOWN_ONLY])
def test_char_model_prompt_of_only_unknown_characters_is_400(server, text):
    err = assert_400(httpx.post(server.url + C, json={"model": CHAR, "prompt": text, "max_tokens": 2}, timeout=10),
                     "prompt")
    assert "not in the char vocabulary" in err["message"], err
    r = httpx.post(server.url + CHAT, json={"model": CHAR, "messages": [{"role": "user", "content": text}],
                                             "max_tokens": 2}, timeout=10)
    assert_400(r, "messages")
    # the BPE model tokenizes any text (byte-level)
    r = httpx.post(server.url + C, json={"model": BPE, "prompt": text, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    strict_json(r)


LONE_SURROGATE = [  # JSON escapes that decode to a lone UTF-16 surrogate: valid JSON, not valid Unicode
    ("prompt", C, b'{"model": "%s", "prompt": "ab\\ud800", "max_tokens": 2}'),
    ("prompt-echo", C, b'{"model": "%s", "prompt": "ab\\udfff", "max_tokens": 2, "echo": true}'),
    ("prompt-list", C, b'{"model": "%s", "prompt": ["a", "\\udc00"], "max_tokens": 2, "echo": true}'),
    ("stream-echo", C, b'{"model": "%s", "prompt": "a\\ud800", "max_tokens": 2, "echo": true, "stream": true}'),
    ("chat", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("chat-parts", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("route,raw", [c[1:] for c in LONE_SURROGATE], ids=[c[0] for c in LONE_SURROGATE])
def test_lone_surrogates_are_400(server, model, route, raw):
    r = post(server, route, raw.replace(b"%s", model.encode()))
    assert_400(r)


@pytest.mark.parametrize("raw", [
    b'{"model": "\\ud800", "prompt": "a"}', b'{"model": "%s", "prompt": "a", "\\ud800": 1}',
    b'{"model": "%s", "prompt": "a", "user": "\\udfff"}', b'{"model": "%s", "prompt": "a", "stop": ["\\ud800"]}',
    b'\xef\xbb\xbf{"model": "%s", "prompt": "a", "max_tokens": 1}',  # UTF-8 byte order mark
    b'{"model": "%s", "prompt": "\xc0\xaf"}',  # overlong encoding of "/"
    b'{"model": "%s", "prompt": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes
    b'{"model": "\xff%s", "prompt": "a"}',
    ('{"model": "%s", "prompt": "a", "max_tokens": 1}' % BPE).encode("utf-16"),
], ids=["model", "key", "user", "stop", "bom", "overlong", "utf8-surrogate", "model-bytes", "utf-16-body"])
def test_odd_encodings_never_500(server, raw):
    """Each is refused (400) or, where the bytes still decode to a valid request, answered (200)."""
    r = post(server, C, raw.replace(b"%s", BPE.encode()))
    assert r.status_code in (200, 400), (r.status_code, r.text)
    strict_json(r)


def test_endoftext_in_prompts(server):
    # the char model has no '<', '|' or '>': 400 naming them
    err = assert_400(httpx.post(server.url + C, json={"model": CHAR, "prompt": "<|endoftext|>"}, timeout=10), "prompt")
    assert "'<'" in err["message"] and "'|'" in err["message"], err
    # GPT-2's BPE: the literal is its one special token, 50256, as HF's tokenizer reads it
    body = {"model": BPE, "prompt": "<|endoftext|>", "max_tokens": 0, "echo": True, "logprobs": 1}
    r = httpx.post(server.url + C, json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = strict_json(r)
    assert out["usage"]["prompt_tokens"] == 1 and out["choices"][0]["logprobs"]["tokens"] == ["<|endoftext|>"], out
    r = httpx.post(server.url + C, json={**body, "prompt": "a<|endoftext|>b"}, timeout=30)
    assert r.status_code == 200 and strict_json(r)["usage"]["prompt_tokens"] == 3, r.text
    # as token ids, in chat, as a stop string, streamed: all served
    r = httpx.post(server.url + C, json={"model": BPE, "prompt": [50256, 50256], "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + CHAT, json={"model": BPE, "max_tokens": 2, "stop": ["<|endoftext|>"],
                                             "messages": [{"role": "user", "content": "<|endoftext|><|endoftext|>"}]},
                   timeout=30)
    assert r.status_code == 200, r.text
    with httpx.stream("POST", server.url + C, json={"model": BPE, "prompt": "<|endoftext|>", "max_tokens": 3,
                                                     "stream": True, "echo": True}, timeout=30) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["choices"][0]["text"].startswith("<|endoftext|>")


NUMBERS = [
    # (id, JSON text of the value, field)  -- none of these is in tests/test_server_errors.py
    ("10k-digit-int", "9" * 10_000, "max_tokens"),  # over Python's int-parsing limit
    ("10k-digit-float", "1" * 10_000 + ".5", "temperature"),  # parses to inf
    ("neg-10k-digit-int", "-" + "9" * 10_000, "seed"),
    ("2**64", str(2 ** 64), "seed"),
    ("-2**63-1", str(-(2 ** 63) - 1), "seed"),
    ("2**63-token", f"[1, {2 ** 63}]", "prompt"),
    ("huge-token-list", f"[[{2 ** 100}]]", "prompt"),
    ("1e400-int", "1e400", "max_tokens"),
    ("-1e400", "-1e400", "temperature"),
    ("fraction-int", "4.5", "max_tokens"),
    ("nan-string", '"NaN"', "temperature"),
    ("inf-string", '"inf"', "top_p"),
    ("infinity-string", '"-Infinity"', "frequency_penalty"),
    ("nan-in-token-list", "[1, NaN]", "prompt"),
    ("inf-in-stop", '["a", Infinity]', "stop"),
    ("nan-logit-bias", '{"1": NaN}', "logit_bias"),
    ("inf-n", "Infinity", "n"),
    ("inf-logprobs", "Infinity", "logprobs"),
    ("nan-settle", "NaN", "settle_steps"),
    ("huge-top-k-float", "1e30", "top_k"),
]


@pytest.mark.parametrize("value,field", [c[1:] for c in NUMBERS], ids=[c[0] for c in NUMBERS])
def test_huge_numbers_and_non_finite_values_are_400(server, value, field):
    for model in MODELS:
        raw = f'{{"model": "{model}", "prompt": "ab", "max_tokens": 2, "{field}": {value}}}'.replace(
            '"max_tokens": 2, "max_tokens"', '"max_tokens"')
        assert_400(post(server, C, raw.encode()))
        if field != "prompt":
            chat = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "ab"}}], "{field}": {value}}}'
            if field != "logprobs":  # chat's logprobs is a bool
                assert_400(post(server, CHAT, chat.encode()))


@pytest.mark.parametrize("value,expected", [("1e-400", 0.0), ("-0.0", 0.0), ("4.0", None)])
def test_numbers_that_are_still_valid(server, value, expected):
    """An underflow to 0, a negative zero and an integral float are their plain values (200)."""
    field = "temperature" if expected is not None else "max_tokens"
    raw = f'{{"model": "{CHAR}", "prompt": "ROMEO:", "max_tokens": 4, "{field}": {value}}}'.replace(
        '"max_tokens": 4, "max_tokens"', '"max_tokens"')
    r = post(server, C, raw.encode())
    assert r.status_code == 200, r.text
    assert strict_json(r)["usage"]["completion_tokens"] == 4


def test_deeply_nested_json_is_400(server):
    for raw in ("[" * 200_000 + "]" * 200_000, '{"model": "x", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
                '{"a":' * 50_000 + "1" + "}" * 50_000):
        assert_400(post(server, C, raw.encode()))


# --- afterwards -----------------------------------------------------------------------------------

def test_fuzz_totals_and_server_still_ready(server):
    """Runs last (file order): enough requests were sent, none answered 5xx, the
    server is still ready and logged no traceback."""
    if not SENT["requests"]:
        pytest.skip("the fuzz test did not run in this session")
    print(f"\nfuzz: {SENT['requests']} requests, by status: {dict(sorted(SENT['by_status'].items()))}, "
          f"streams answered: {SENT['streams']}")
    if EXAMPLES_PER_OPERATION >= 350:
        assert SENT["requests"] >= MIN_REQUESTS, SENT
    assert not any(status >= 500 for status in SENT["by_status"]), SENT
    assert SENT["by_status"].get(200, 0) >= 100, SENT  # generation was reached, not only refusals
    assert all(SENT["streams"].get(route, 0) >= 10 for route in (C, CHAT)), SENT  # and streams' events checked
    r = httpx.get(server.url + "/ready", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    log = Path(server.log_path).read_text()
    assert "Traceback" not in log and '" 500' not in log, log[-4000:]
