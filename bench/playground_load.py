"""Does an open playground cost serving throughput? HTTP tokens/s of 16 closed-loop streaming
clients (bench/http_load.py's load on the shipped char baseline) in four conditions, measured
in interleaved rounds; median and range of each:

- none: the 16 clients alone;
- plain: plus one more stream of the same length without logprobs or uncertainty (a 17th
  sequence: the decode batch's rows go from 16 to the next power of two, 32);
- api: plus one more stream sending, back to back, the request the playground sends (the same
  model, 240 tokens, logprobs 5 and uncertainty), from the load generator's event loop: what the
  playground's request costs the server;
- page: plus one chromium tab on the real playground page running that request back to back:
  the request and the page. Chromium runs on this machine, beside the server, so its own CPU is
  part of what this condition pays here (a user's browser runs elsewhere).

    nice -n 10 .venv/bin/python -m bench.playground_load [--rounds 3]"""

import argparse
import asyncio
import json
import statistics
import sys
import threading

from bench.common import CHAR_CKPT, RESULTS, ROOT, machine
from bench.http_load import MAX_TOKENS, TARGET_LEVEL, http_level

CHROMIUM = "/usr/bin/chromium"
PLAYGROUND_TOKENS = 240
# what the page sends (pcgpt/serve/playground/playground.js, requestBody) for a run at temperature 1
PLAYGROUND_BODY = {"model": "shakespeare-char", "prompt": "ROMEO:", "max_tokens": PLAYGROUND_TOKENS, "temperature": 1,
                   "seed": 1, "sampler": "standard", "stream": True, "stream_options": {"include_usage": True},
                   "logprobs": 5, "uncertainty": True}
PLAIN_BODY = {k: v for k, v in PLAYGROUND_BODY.items() if k not in ("logprobs", "uncertainty")}


class PlaygroundTab(threading.Thread):
    """One chromium tab on the playground, running completions back to back until stopped."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.runs = 0
        self.error = None

    def run(self):
        from playwright.sync_api import sync_playwright
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(self.url)
                page.wait_for_selector("#model-a option", state="attached")
                page.select_option("#model-a", "shakespeare-char")
                page.fill("#max_tokens", str(PLAYGROUND_TOKENS))
                page.fill("#temperature-a", "1")
                self.ready.set()
                while not self.stop.is_set():
                    page.click("#run")
                    self.runs += 1
                    page.wait_for_selector(f"body[data-runs='{self.runs}']", state="attached", timeout=300_000)
                browser.close()
        except Exception as e:  # reported by the main thread
            self.error = e
            self.ready.set()


async def stream_beside(url: str, body: dict, per_client: int, time_cap: float, server_pid: int) -> dict:
    import httpx
    stop = asyncio.Event()
    runs = 0

    async def playground_requests():
        nonlocal runs
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            while not stop.is_set():
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                runs += 1

    task = asyncio.create_task(playground_requests())
    try:
        out = await http_level(url, TARGET_LEVEL, per_client, time_cap, server_pid)
    finally:
        stop.set()
        await task
    out["playground_runs"] = runs
    return out


def level(server, condition: str, per_client: int, time_cap: float) -> dict:
    if condition in ("plain", "api"):
        body = PLAYGROUND_BODY if condition == "api" else PLAIN_BODY
        return asyncio.run(stream_beside(server.url, body, per_client, time_cap, server.proc.pid))
    browser = None
    if condition == "page":
        browser = PlaygroundTab(server.url + "/")
        browser.start()
        browser.ready.wait(120)
        if browser.error:
            raise browser.error
    try:
        out = asyncio.run(http_level(server.url, TARGET_LEVEL, per_client, time_cap, server.proc.pid))
    finally:
        if browser:
            browser.stop.set()
            browser.join(300)
    if browser:
        if browser.error:
            raise browser.error
        out["playground_runs"] = browser.runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four conditions, in rotating order")
    parser.add_argument("--tokens", type=int, default=4000, help="completion tokens per level (all clients)")
    parser.add_argument("--time-cap", type=float, default=20.0, help="seconds per level at most")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import Server
    per_client = max(2, -(-args.tokens // (MAX_TOKENS * TARGET_LEVEL)))
    conditions = ("none", "plain", "api", "page")
    rows = {c: [] for c in conditions}
    models = {"shakespeare-char": CHAR_CKPT}
    with Server(models, "--max-batch-size", str(2 * TARGET_LEVEL), "--log-level", "warning") as server:
        for i in range(args.rounds):
            for name in conditions[i % len(conditions):] + conditions[:i % len(conditions)]:
                r = level(server, name, per_client, args.time_cap)
                rows[name].append(r)
                print(f"round {i + 1} {name:4s}: {r['tok_s']:.0f} tokens/s "
                      f"(TTFT p50 {r['ttft_p50_ms']:.0f} ms, ITL p50 {r['itl_p50_ms']:.1f} ms)", flush=True)
    summary = {}
    for name, rs in rows.items():
        tok_s = [r["tok_s"] for r in rs]
        summary[name] = {"median_tok_s": statistics.median(tok_s), "min_tok_s": min(tok_s), "max_tok_s": max(tok_s),
                         "runs": tok_s}
        print(f"{name:4s}: median {summary[name]['median_tok_s']:.0f} tokens/s "
              f"(range {min(tok_s):.0f}-{max(tok_s):.0f}, {len(tok_s)} levels)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "playground_load.json").write_text(json.dumps(
        {"machine": machine(), "clients": TARGET_LEVEL, "max_tokens": MAX_TOKENS, "per_client": per_client,
         "summary": summary, "levels": rows}, indent=1))


if __name__ == "__main__":
    main()
