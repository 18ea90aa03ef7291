"""The live monitor in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Never `playwright install`: the test drives the system binary. Skipped only when it is not installed
(`apt-get install -y chromium`; scripts/test.sh installs it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.fake_processes import fake_fleet_processes
from tests.support import REPO, make_config, run_balancer

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARTIFACTS = REPO / "tests" / "artifacts"
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# A backend name that turns into markup if the page ever parses data as HTML.
HOSTILE = "beta<b>bold<b>&amp;"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)


async def test_monitor_shows_each_backend_and_a_stopped_one_changes_state(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    assert CHROMIUM is not None
    with fake_fleet_processes(tmp_path) as fakes:
        config = make_config([f"{fakes[0].url}=alpha", f"{fakes[1].url}={HOSTILE}"])
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    assert reply.status == 200
                    await reply.read()
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
                try:
                    page = await browser.new_page(viewport={"width": 1100, "height": 800})
                    remote: list[str] = []
                    page.on("request", lambda r: None if r.url.startswith(balancer.url) else remote.append(r.url))
                    await page.goto(balancer.url + "/llmhealth-monitor")

                    rows = page.locator("[data-testid=backend-row]")
                    await expect(rows).to_have_count(2, timeout=10_000)
                    alpha = rows.filter(has_text="alpha")
                    beta = rows.filter(has_text="beta")
                    await expect(alpha).to_have_attribute("data-state", "healthy")
                    await expect(beta).to_have_attribute("data-state", "healthy")
                    # A name with markup is shown as text, never parsed as HTML.
                    await expect(beta.locator(".name")).to_have_text(HOSTILE)
                    assert await page.locator(".backend .name b").count() == 0
                    # Requests waiting inside a server and in the balancer's own queue are told apart.
                    await expect(alpha.locator(".stats")).to_contain_text("waiting in server")
                    await expect(page.locator("#queue")).to_have_text("waiting in the balancer's queue 0 / 10000")
                    await expect(page.locator("#requests tr")).to_have_count(2, timeout=10_000)

                    fakes[1].stop()
                    await expect(beta).to_have_attribute("data-state", "unhealthy", timeout=10_000)
                    await expect(beta.locator(".state")).to_have_text("unhealthy")
                    await expect(alpha).to_have_attribute("data-state", "healthy")

                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    await page.screenshot(path=str(ARTIFACTS / "monitor.png"), full_page=True)

                    # Narrow screen (a phone): both cards still there, nothing wider than the viewport.
                    await page.set_viewport_size({"width": 390, "height": 844})
                    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                    assert overflow <= 0
                    await page.screenshot(path=str(ARTIFACTS / "monitor-phone.png"), full_page=True)
                    assert remote == [], f"the monitor fetched from elsewhere: {remote}"
                finally:
                    await browser.close()
    assert (ARTIFACTS / "monitor.png").stat().st_size > 0
