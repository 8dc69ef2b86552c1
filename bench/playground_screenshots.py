"""The playground's screenshots in docs/ (desktop 1280 px and phone 390 px wide, single and
compare mode), taken by Debian's chromium from the real page of a real `pcgpt serve` with the
shipped models.

    .venv/bin/python -m bench.playground_screenshots

Each PNG is reduced to a 256-colour palette so it stays small in the repository."""

import sys
from pathlib import Path

from PIL import Image

from bench.common import ROOT

DOCS = ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"
WIDTHS = {"desktop": (1280, 860), "phone": (390, 844)}
PROMPT = "ROMEO:"


def single(page):
    """The PC model with the error-driven sampler: shading, the tooltip, surprise/entropy/μ/τ."""
    page.select_option("#model-a", "shakespeare-char-pc")
    page.fill("#max_tokens", "160")
    page.fill("#temperature-a", "0.8")
    page.select_option("#sampler-a", "error_driven")
    page.fill("#mirostat_tau-a", "2.5")
    page.click("#run")
    page.wait_for_selector("body[data-runs='1']", state="attached", timeout=180_000)
    page.click(".column .token >> nth=12")  # a tap pins the tooltip


def compare(page):
    """Baseline vs PC, both greedy: the first divergent token is marked."""
    page.fill("#max_tokens", "80")
    page.check("#compare")
    page.select_option("#preset", "baseline-pc")
    page.fill("#temperature-b", "0")
    page.click("#run")
    page.wait_for_selector("body[data-runs='1']", state="attached", timeout=180_000)


def shoot(browser, url, name, width, height, scene, scroll_to=None):
    context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#model-a option", state="attached")
    page.fill("#prompt", PROMPT)
    scene(page)
    if scroll_to:
        page.locator(scroll_to).scroll_into_view_if_needed()
    path = DOCS / f"{name}.png"
    page.screenshot(path=str(path))
    context.close()
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KB")


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from playwright.sync_api import sync_playwright
    from serving import Server
    with Server(None) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for device, (width, height) in WIDTHS.items():
            # on a phone the controls come first: show the output
            scroll = ".column:last-child .plot-legend" if device == "phone" else None
            shoot(browser, server.url + "/", f"playground-{device}", width, height, single, scroll)
            shoot(browser, server.url + "/", f"playground-{device}-compare", width, height, compare, scroll)
        browser.close()


if __name__ == "__main__":
    main()
