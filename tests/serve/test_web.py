"""The chat page in a real browser: Debian's headless chromium driven by Playwright against a live server.

Run: `pytest tests/serve/test_web.py` (needs /usr/bin/chromium: `apt-get install -y chromium`, which .ci/run does).
The screenshot lands in pytest's tmp dir and, when $RECURCHAT_ARTIFACTS is set, is copied there as web_chat.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support import smoke_run

from recurchat.checkpoint import load_model
from recurchat.serve.server import create_app, start_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"{CHROMIUM} missing (apt-get install -y chromium; .ci/run installs it)")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_text):
    out = smoke_run(tmp_path_factory.mktemp("runs"), small_text)
    srv = start_in_thread(create_app(load_model(str(out), "cpu")))
    yield srv
    srv.stop()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # a fresh profile per test: no cached page, no state from a developer's own browsing
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1100, "height": 720})
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


def send(page, text: str, n_done: int) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector(f".msg.assistant[data-done='1'] >> nth={n_done - 1}", timeout=30_000)


def test_chat_streams_depth_tinted_tokens(server, page, tmp_path):
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(f"{server.url}/")
    page.wait_for_function("document.querySelector('#model-name').textContent.startsWith('smoke')")

    # greedy, so every run shows the same reply: a sampled first token can be a special token, which ends the
    # reply with no text at all
    page.fill("#temperature", "0")
    # fixed depth: every token (prefill included) ran exactly r = 3 iterations
    page.fill("#num-recur", "3")
    page.fill("#max-tokens", "16")
    send(page, "Hello there", 1)
    first = page.locator(".msg.assistant").nth(0)
    toks = first.locator("span.tok[data-depth]")
    assert toks.count() >= 1
    assert set(toks.evaluate_all("els => els.map(e => e.dataset.depth)")) == {"3"}
    backgrounds = toks.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert all(b.startswith("rgba(") and not b.endswith(", 0)") for b in backgrounds), backgrounds
    assert page.locator("#legend .swatch").count() == 8  # one colour scale, 1 … r_max = 8, for every message
    n_depths = sum(len(d.split(",")) for d in toks.evaluate_all("els => els.map(e => e.dataset.depths)"))
    assert first.locator("svg.depth-chart rect").count() == n_depths
    assert "mean depth 3.00" in first.locator(".meta").inner_text()

    # adaptive depth: a criterion that never fires runs every decoded token to max r
    page.select_option("#kv", "ring:2")
    page.check("#mode-exit")
    # ring:K is refused with exits, so the page falls back to the full cache and disables the ring options
    assert page.eval_on_selector("#kv", "s => s.value") == "full"
    assert page.eval_on_selector("#kv", "s => [...s.options].filter(o => o.disabled).map(o => o.value)") == [
        "ring:2", "ring:4"]
    page.select_option("#exit-kind", "argmax")
    page.fill("#exit-threshold", "1000")
    page.fill("#max-recur", "6")
    send(page, "And again", 2)
    depths = page.locator(".msg.assistant").nth(1).locator("span.tok").evaluate_all(
        "els => els.flatMap(e => e.dataset.depths.split(',').map(Number))")
    assert depths and set(depths[1:]) <= {6}

    assert not errors, errors
    # a client error shows up in the page, not as a broken stream
    page.fill("#temperature", "5")
    page.fill("#prompt", "too hot")
    page.click("#send")
    page.wait_for_selector(".msg.error")
    assert "temperature" in page.locator(".msg.error").inner_text()
    page.fill("#temperature", "0.8")

    shot = tmp_path / "web_chat.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("RECURCHAT_ARTIFACTS"):
        dest = Path(os.environ["RECURCHAT_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "web_chat.png")
    assert shot.stat().st_size > 10_000
