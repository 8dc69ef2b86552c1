"""Security: the API key guards every inference route (compared in constant time), CORS is closed
unless an origin is configured, prompt and body sizes are limited, no file the server reads can run
code through pickle, and the container runs as a non-root user.

tests/test_server_errors.py has the API-key answers per header form, the 413s and the loader-level
checkpoint errors; this file adds what those do not cover.
"""

import hmac
import re
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from bench import reliability as rel
from tests.serving import Server

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
MODEL = rel.MODEL
KEY = "s3cret-key"
ALLOWED = "https://app.example.com"
FOREIGN = "https://evil.example.net"
MAX_PROMPT_CHARS = 64
# routes that answer without a key, on purpose: probes, metrics scraping, the API's own description
OPEN_ROUTES = {"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
               "/", "/playground"}  # the playground is a static page: it asks for the key, then sends it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return rel.snapshot_baseline(tmp_path_factory.mktemp("sec") / "base")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    with Server({MODEL: ckpt}, "--api-key", KEY, "--cors-origin", ALLOWED, "--max-prompt-chars", str(MAX_PROMPT_CHARS),
                log_path=tmp_path_factory.mktemp("log") / "server.log") as s:
        yield s


def auth(**headers):
    return {"Authorization": f"Bearer {KEY}", **headers}


# --- the API key --------------------------------------------------------------------------------------

def test_every_route_but_the_open_ones_needs_the_key(monkeypatch):
    """Every route the app has, now and later: /v1 routes answer 401 without the right key, and
    the key is checked with hmac.compare_digest (constant time)."""
    from pcgpt.serve.config import ServerConfig
    from pcgpt.serve.server import create_app
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    app = create_app(ServerConfig(api_key=KEY), {})
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in sorted(r.methods)]
    guarded = [(m, p) for m, p in routes if p not in OPEN_ROUTES]
    assert all(p.startswith("/v1/") for _, p in guarded), f"a new route is neither /v1 nor open: {guarded}"
    assert {p for _, p in guarded} >= {"/v1/models", "/v1/models/{model_id}", "/v1/completions", "/v1/chat/completions"}
    with TestClient(app) as client:
        for method, path in guarded:
            path = path.replace("{model_id}", MODEL)
            body = {"model": MODEL, "prompt": "a"} if method == "POST" else None
            for headers in ({}, {"Authorization": "Bearer " + KEY[:-1]}, {"Authorization": "Bearer " + KEY + "x"},
                            {"Authorization": KEY}, {"Cookie": f"api_key={KEY}"}):
                compared.clear()
                r = client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and KEY not in r.text
            compared.clear()
            r = client.request(method, path, json=body, headers=auth())
            assert r.status_code != 401, (method, path, r.text)
            assert compared == [(KEY.encode(), KEY.encode())], "the key must be compared with hmac.compare_digest"
        for path in ("/health", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200


@pytest.mark.server
def test_key_checked_before_anything_about_the_request(server):
    """Without the key, nothing about models or the request leaks: an unknown model, a streamed
    request and a model lookup all get the same 401."""
    url = server.url
    for method, path, body in (("POST", "/v1/completions", {"model": "no-such-model", "prompt": "a"}),
                               ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "stream": True}),
                               ("POST", "/v1/chat/completions", {"model": MODEL, "messages": "not even a list"}),
                               ("GET", "/v1/models/no-such-model", None), ("GET", f"/v1/models/{MODEL}", None)):
        r = httpx.request(method, url + path, json=body, timeout=10)
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/json"), (path, r.text)
        assert "no-such-model" not in r.text and MODEL not in r.text
    r = httpx.get(url + f"/v1/models/{MODEL}", headers=auth(), timeout=10)
    assert r.status_code == 200 and r.json()["id"] == MODEL


# --- CORS ---------------------------------------------------------------------------------------------

def preflight(client_or_url, origin, path="/v1/completions"):
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    if isinstance(client_or_url, str):
        return httpx.options(client_or_url + path, headers=headers, timeout=10)
    return client_or_url.options(path, headers=headers)


def test_cors_closed_by_default(monkeypatch):
    from pcgpt.cli import build_parser
    from pcgpt.serve.config import ServerConfig
    from pcgpt.serve.server import create_app
    monkeypatch.delenv("PCGPT_CORS_ORIGINS", raising=False)
    assert build_parser().parse_args(["serve"]).cors_origin == [] and ServerConfig().cors_origins == []
    with TestClient(create_app(ServerConfig(), {})) as client:
        r = preflight(client, FOREIGN)
        assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers, r.headers
        for path in ("/health", "/v1/models", "/metrics"):
            r = client.get(path, headers={"Origin": FOREIGN})
            assert "access-control-allow-origin" not in r.headers, (path, r.headers)


@pytest.mark.server
def test_cors_open_only_for_the_configured_origin(server):
    r = preflight(server.url, ALLOWED)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2},
                   headers=auth(Origin=ALLOWED), timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    for origin in (FOREIGN, "null", ALLOWED + ".evil.net", ALLOWED.replace("https", "http")):
        r = preflight(server.url, origin)
        assert "access-control-allow-origin" not in r.headers, (origin, r.headers)
        r = httpx.get(server.url + "/v1/models", headers=auth(Origin=origin), timeout=10)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, (origin, r.headers)
        assert r.headers.get("access-control-allow-origin") != "*"


# --- sizes ---------------------------------------------------------------------------------------------

@pytest.mark.server
def test_prompt_size_limit(server):
    url = server.url + "/v1/completions"

    def complete(prompt, **kw):
        return httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 2, **kw}, headers=auth(), timeout=30)

    assert complete("a" * MAX_PROMPT_CHARS).status_code == 200
    for prompt in ("a" * (MAX_PROMPT_CHARS + 1), ["a", "b" * (MAX_PROMPT_CHARS + 1)], "a" * 100_000):
        r = complete(prompt)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prompt" and f"limit is {MAX_PROMPT_CHARS}" in err["message"], err
    # chat: the templated conversation counts ("USER:\n" + text + "\n\n" + "ASSISTANT:\n")
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=30,
                   json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "a" * 60}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    # the body limit (default 1 MiB) comes before everything else, the key included
    r = httpx.post(url, content=b'{"prompt": "' + b"a" * (1 << 20) + b'"}', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text


# --- pickles --------------------------------------------------------------------------------------------

@pytest.mark.server
def test_serve_never_runs_a_pickle(ckpt, tmp_path):
    """`pcgpt serve` on every file it may read that could hold a pickle: a nanoGPT ckpt.pt, the
    meta.pkl beside one, an HF pytorch_model.bin. Each holds code that would write a marker file."""
    figures = rel.run_bad_checkpoints(ckpt, tmp_path, kinds=("pickle",))
    assert figures["problems"] == [], figures
    assert len(figures["cases"]) == 3 and not figures["code_ran"] and not (tmp_path / "marker").exists()
    for case in figures["cases"]:
        assert case["exit_code"] == 2, case
        assert "refuse" in case["message"], case


# --- the container --------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def test_dockerfile_runs_as_a_non_root_user():
    path = ROOT / "Dockerfile"
    if not path.exists():
        pytest.skip("no Dockerfile yet")
    steps = dockerfile_instructions(path.read_text())
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    final = steps[last_from:]  # the stage that becomes the image
    users = [(i, rest) for i, (k, rest) in enumerate(final) if k == "USER"]
    assert users, "the final stage has no USER: the container would run as root"
    index, user = users[-1]
    name = user.split(":")[0].strip()
    assert name not in ("root", "0", "") and not name.startswith("$"), f"USER {user}"
    if ":" in user:
        assert user.split(":")[1].strip() not in ("root", "0"), f"USER {user}: group root"
    # the user exists: created in the image with that name or uid
    created = [rest for k, rest in final[:index] if k == "RUN" and re.search(r"\b(useradd|adduser)\b", rest)]
    assert any(re.search(rf"(--uid|-u)\s+{re.escape(name)}\b", r) or re.search(rf"\s{re.escape(name)}\s*$", r)
               for r in created), f"USER {name} is not created by a useradd/adduser step: {created}"
    # and the process starts as that user: no later USER root, no su/sudo in what runs
    for k, rest in final[index:]:
        if k in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
            assert not re.search(r"\b(sudo|su|gosu|setpriv)\b", rest), (k, rest)
