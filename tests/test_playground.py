"""The browser playground (pcgpt/serve/playground/, served by pcgpt/serve/web.py), driven in
Debian's chromium by Playwright against one real `pcgpt serve` started with --api-key.

Every page runs under the server's own Content-Security-Policy (no bypass), and every request to
another origin is refused and recorded: the page and /docs must work offline."""

import re
import shutil
import time

import httpx
import pytest
import torch

from serving import SHIPPED, Server

pytestmark = [pytest.mark.server, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"  # Debian's (the Makefile's deps-system installs it); nothing downloaded
KEY = "playground-test-key"
BASELINE, PC = SHIPPED
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def server():
    with Server(None, "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def browser(server):  # after the server, so closed before it: the server then has no open connection to drain
    if shutil.which("chromium") is None:
        pytest.fail(f"{CHROMIUM} is missing: `make deps-system` installs Debian's chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A fresh tab (its own sessionStorage) on the server; records requests to other origins,
    script errors and anything the page's policy blocked."""

    def __init__(self, browser, server, width=1280, height=900):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.external = []
        self.errors = []
        self.context.route(lambda url: not url.startswith(server.url), self._refuse)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: "Content Security Policy" in m.text and self.errors.append(m.text))
        self.url = server.url

    def _refuse(self, route):
        self.external.append(route.request.url)
        route.abort()

    def open(self, path="/", key=KEY):
        self.page.goto(self.url + path)
        if key is not None:
            self.enter_key(key)
            self.page.wait_for_selector("#model-a option", state="attached")
        return self.page

    def enter_key(self, key):
        self.page.wait_for_selector("#key-form:not([hidden])")
        self.page.fill("#api-key", key)
        self.page.press("#api-key", "Enter")

    def run(self, runs=1):
        self.page.click("#run")
        self.page.wait_for_selector(f"body[data-runs='{runs}']", state="attached", timeout=120_000)

    def tokens(self, column=0):
        """(text, shaded value) of each token span of an output column."""
        return self.page.locator(".column").nth(column).locator(".token").evaluate_all(
            "spans => spans.map(s => [s.textContent, s.dataset.value])")


@pytest.fixture
def tab(browser, server):
    t = Page(browser, server)
    yield t
    assert not t.errors, t.errors
    assert not t.external, f"the page asked other origins: {t.external}"
    t.context.close()


def api(server, body):
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def greedy_run(tab, model, max_tokens, **fields):
    page = tab.page
    page.fill("#prompt", PROMPT)
    page.fill("#max_tokens", str(max_tokens))
    page.select_option("#model-a", model)
    page.fill("#temperature-a", "0")
    for name, value in fields.items():
        page.fill(f"#{name}-a", str(value))


# --- tests -------------------------------------------------------------------------------------

def test_page_lists_the_models_under_its_policy(tab, server):
    response = tab.page.goto(server.url + "/")
    policy = response.headers["content-security-policy"]
    script_src = re.search(r"script-src ([^;]*)", policy).group(1).split()
    assert script_src == ["'self'"] and "default-src 'none'" in policy and "connect-src 'self'" in policy
    tab.enter_key(KEY)
    tab.page.wait_for_selector("#model-a option", state="attached")
    cards = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    options = tab.page.locator("#model-a option").evaluate_all("os => os.map(o => [o.value, o.textContent])")
    assert [v for v, _ in options] == [c["id"] for c in cards]
    kinds = {v: label for v, label in options}
    assert "(baseline," in kinds[BASELINE] and "(PC," in kinds[PC]
    # settle_steps applies to PC models only
    tab.page.select_option("#model-a", BASELINE)
    assert tab.page.is_disabled("#settle_steps-a")
    tab.page.select_option("#model-a", PC)
    assert tab.page.is_enabled("#settle_steps-a")
    assert tab.page.get_attribute("#settle_steps-a", "max") == "16"


def test_api_key_asked_once_per_tab(tab, server):
    page = tab.page
    page.goto(server.url + "/playground")
    missing = httpx.get(server.url + "/v1/models").json()["error"]["message"]
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.text_content("#key-error") == missing and page.is_disabled("#run")
    tab.enter_key("wrong-key")
    page.wait_for_selector("#key-error:not(:empty)")
    assert page.text_content("#key-error") == missing  # the API's 401 message
    assert page.is_visible("#key-form")
    tab.enter_key(KEY)
    page.wait_for_selector("#key-form", state="hidden")
    page.wait_for_selector("#model-a option", state="attached")
    assert page.evaluate("() => sessionStorage.getItem('pcgpt-api-key')") == KEY
    page.reload()  # kept for the tab: not asked again
    page.wait_for_selector("#model-a option", state="attached")
    assert page.is_hidden("#key-form")


def test_greedy_pc_run_renders_the_api_text_entropy_and_alternatives(tab, server):
    tab.open()
    greedy_run(tab, PC, 16, settle_steps=2)
    tab.run()
    api_choice = api(server, {"model": PC, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "settle_steps": 2,
                              "logprobs": 5, "uncertainty": True})
    tokens = tab.tokens()
    assert "".join(t for t, _ in tokens) == api_choice["text"]
    assert [t for t, _ in tokens] == api_choice["logprobs"]["tokens"]
    shown = torch.tensor([float(v) for _, v in tokens])
    expected = torch.tensor([u["entropy"] for u in api_choice["uncertainty"]])
    # the same greedy request twice through the batched decode step: equal up to float32 rounding
    torch.testing.assert_close(shown, expected, rtol=1e-4, atol=1e-5)
    assert "finished (length)" in tab.page.text_content(".stats")
    assert tab.page.text_content(".prompt-text") == PROMPT
    assert "surprise" in tab.page.text_content(".plot-legend")
    assert tab.page.locator(".plot polyline").count() == 2  # surprise and entropy

    # the tooltip: the top-5 alternatives with their probabilities, and every uncertainty field
    k = 5
    tab.page.hover(f".column .token >> nth={k}")
    tip = tab.page.locator("#tooltip")
    assert tip.is_visible()
    rows = tip.locator(".tip-top tr").evaluate_all("rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    top = api_choice["logprobs"]["top_logprobs"][k]
    assert [r[0] for r in rows] == [f'"{t}"' if t != "\n" else '"\\n"' for t in top]
    assert [r[1] for r in rows] == [f"{100 * torch.tensor(lp).exp().item():.2f}%" for lp in top.values()]
    fields = tip.locator(".tip-fields tr td:first-child").all_text_contents()
    assert fields == list(api_choice["uncertainty"][k])
    assert {"entropy", "surprise", "kl_settle", "energy", "steps", "err_up"} <= set(fields)

    # shading by another signal: the legend names its unit
    tab.page.select_option("#signal", "steps")
    assert tab.page.text_content("#legend-name") == "settle steps (steps)"
    assert {v for _, v in tab.tokens()} == {"2"}


def test_compare_streams_both_and_marks_the_first_divergence(tab, server):
    tab.open()
    page = tab.page
    greedy_run(tab, BASELINE, 32)
    page.check("#compare")
    page.select_option("#preset", "baseline-pc")
    page.fill("#temperature-b", "0")
    tab.run()
    a = api(server, {"model": BASELINE, "prompt": PROMPT, "max_tokens": 32, "temperature": 0})["text"]
    b = api(server, {"model": PC, "prompt": PROMPT, "max_tokens": 32, "temperature": 0})["text"]
    assert a != b, "precondition: the two greedy texts differ"
    at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert page.locator(".column").count() == 2
    for column, text in ((0, a), (1, b)):
        tokens = tab.tokens(column)
        assert "".join(t for t, _ in tokens) == text
        marked = page.locator(".column").nth(column).locator(".token.diverge")
        assert marked.count() == 1
        assert marked.get_attribute("data-index") == str(at)  # char models: token i is character i
    assert f"first divergence at character {at}" in page.text_content("#divergence")


def test_stop_cancels_the_request_on_the_server(tab, server):
    tab.open()
    page = tab.page
    greedy_run(tab, PC, 240, settle_steps=16)
    cancelled_before = server.metric("pcgpt_requests_total", {"model": PC, "finish_reason": "cancelled"})
    page.click("#run")
    page.wait_for_selector(".column .token", state="attached")
    page.click("#stop")
    page.wait_for_selector("body[data-runs='1']", state="attached")
    assert "stopped" in page.text_content(".stats")
    assert len(tab.tokens()) < 240
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = server.metric("pcgpt_num_requests_running", {"model": PC})
        cancelled = server.metric("pcgpt_requests_total", {"model": PC, "finish_reason": "cancelled"})
        if running == 0 and cancelled == cancelled_before + 1:
            break
        time.sleep(0.2)
    assert (running, cancelled) == (0, cancelled_before + 1)


def test_html_in_a_prompt_is_text_and_api_errors_are_the_apis(tab, server):
    tab.open()
    page = tab.page
    prompt = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'
    page.fill("#prompt", prompt)
    page.select_option("#model-a", PC)
    tab.run()
    message = httpx.post(server.url + "/v1/completions", json={"model": PC, "prompt": prompt, "max_tokens": 120,
                                                              "temperature": 0},
                         headers={"Authorization": f"Bearer {KEY}"}).json()["error"]["message"]
    assert page.text_content("#error") == message and "'<'" in message
    assert page.text_content(".prompt-text") == prompt
    assert page.locator(".results img, .results script, #error img, #error script").count() == 0
    assert page.evaluate("() => window.pwned") is None

    page.select_option("#sampler-a", "error_driven")
    tab.page.fill("#prompt", PROMPT)
    tab.run(2)
    message = httpx.post(server.url + "/v1/completions", json={"model": PC, "prompt": PROMPT, "temperature": 0,
                                                              "sampler": "error_driven", "max_tokens": 120},
                         headers={"Authorization": f"Bearer {KEY}"}).json()["error"]["message"]
    assert page.text_content("#error") == message


def test_phone_width_fits_and_controls_are_keyboard_reachable(browser, server):
    tab = Page(browser, server, width=390, height=844)
    try:
        page = tab.open()
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        page.focus("#prompt")
        reached = []
        for _ in range(12):
            page.keyboard.press("Tab")
            reached.append(page.evaluate("() => document.activeElement.id"))
            if reached[-1] == "run":
                break
        assert reached[-1] == "run", reached
        page.fill("#max_tokens", "8")
        page.focus("#run")
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-runs='1']", state="attached")
        page.focus(".output")
        page.keyboard.press("ArrowRight")
        assert page.is_visible("#tooltip") and page.locator(".token.selected").count() == 1
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        assert not tab.errors and not tab.external
    finally:
        tab.context.close()


def test_docs_render_offline(tab, server):
    page = tab.page
    response = page.goto(server.url + "/docs")
    assert "cdn" not in response.text()
    page.wait_for_selector(".opblock")
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert "/v1/completions" in paths and "/v1/models" in paths
    redoc = httpx.get(server.url + "/redoc").text  # served the same way (not rendered here: a 1 MB bundle)
    assert "/docs/static/redoc.standalone.js" in redoc and "https://" not in redoc
