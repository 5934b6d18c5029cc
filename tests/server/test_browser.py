"""Drive the web page (chat playground + dashboard) in headless Chromium via Playwright.

Needs ``pip install playwright`` and a system Chromium (Debian: ``apt-get install -y chromium``);
never ``playwright install`` (no network). Skipped when either is missing.
"""
from __future__ import annotations

import os
import shutil

import pytest
from srv_harness import API_KEY, REPO_ROOT

ARTIFACT = os.path.join(REPO_ROOT, "artifacts", "browser.png")
# Function form (not an expression string): the page's CSP forbids eval, which Playwright
# would need to poll a string expression.
POINTS_AT_LEAST = "(n) => Number(document.getElementById('dashboard').dataset.points) >= n"


def _chromium() -> str | None:
    for cand in (os.environ.get("MINIINFER_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def test_playground_and_dashboard(live_server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")

    base = live_server.base_url
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        except Exception as e:  # noqa: BLE001 - a broken browser install is an environment problem
            pytest.skip(f"cannot launch chromium at {exe}: {e}")
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 960})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)

            page.goto(base + "/")
            page.wait_for_function(POINTS_AT_LEAST, arg=1)
            page.wait_for_selector("#server-status.ok", timeout=30_000)
            assert page.locator("#model-name").inner_text().startswith("SmolLM2")
            gen0 = int(page.locator("#dashboard").get_attribute("data-gen-tokens") or 0)
            points0 = int(page.locator("#dashboard").get_attribute("data-points") or 0)

            # The server requires a key: the field is shown and used.
            assert page.locator("#api-key").is_visible()
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.fill("#system-prompt", "You are a helpful assistant.")
            page.fill("#max-tokens", "40")
            page.evaluate("""() => { const t = document.getElementById('temperature');
                                     t.value = '0'; t.dispatchEvent(new Event('input')); }""")
            # Record every text update of the assistant bubble to prove the reply streams.
            page.evaluate("""() => {
                window.__updates = 0;
                new MutationObserver(() => { window.__updates += 1; })
                  .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
            }""")

            page.fill("#chat-input", "What is the capital of France?")
            page.click("#send")
            page.wait_for_selector("#messages .msg.user", timeout=5_000)
            page.wait_for_selector('#messages .msg.assistant[data-done="true"]', timeout=180_000)

            assert page.locator("#messages .msg.error").count() == 0, page.locator("#messages").inner_text()
            reply = page.locator("#messages .msg.assistant .content").last.inner_text()
            assert reply.strip(), "empty reply"
            assert page.evaluate("window.__updates") >= 4  # user bubble + several streamed pieces
            assert page.locator("#last-ttft").inner_text().endswith("ms")
            assert page.locator("#last-tokens").inner_text() not in ("", "—")
            assert page.locator("#send").is_enabled()

            # The dashboard keeps polling and, after the reply, shows its tokens and an idle engine.
            reply_tokens = int(page.locator("#last-tokens").inner_text().replace(",", ""))
            done_points = int(page.locator("#dashboard").get_attribute("data-points") or 0)
            page.wait_for_function(POINTS_AT_LEAST, arg=done_points + 2, timeout=15_000)
            assert int(page.locator("#dashboard").get_attribute("data-points")) > points0
            gen = int(page.locator("#stat-gen-tokens").inner_text().replace(",", ""))
            assert gen >= gen0 + reply_tokens
            assert page.locator("#stat-running").inner_text() == "0"
            assert page.locator("#stat-ttft").inner_text() != "—"  # recent TTFT mean now known
            painted = page.evaluate("""() => {
                const c = document.getElementById('chart-throughput');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                return n; }""")
            assert painted > 500  # axes, grid and the series were drawn

            os.makedirs(os.path.dirname(ARTIFACT), exist_ok=True)
            page.screenshot(path=ARTIFACT, full_page=True)
            assert os.path.getsize(ARTIFACT) > 10_000
            assert not problems, problems
        finally:
            browser.close()
