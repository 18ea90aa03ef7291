"""The monitor of one replica shows the deployment: the replica it is, the others with when each was last
seen, and a warning while the shared state (Redis) is away. Headless Debian chromium, as the monitor's test."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.redis_support import running_redis, two_replicas
from tests.test_monitor_browser import CHROMIUM, LAUNCH_ARGS

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)


async def test_the_monitor_lists_the_replicas_and_warns_while_redis_is_away(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    assert CHROMIUM is not None
    with running_redis(tmp_path) as redis:
        async with (
            run_fake_fleet(1) as fakes,
            two_replicas(redis, [f"{fakes[0].url}=alpha"]) as (a, _b),
            async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 800})
                await page.goto(a.url + "/llmhealth-monitor")
                await expect(page.locator("#replica")).to_have_text(
                    "replica A · 2 of 2 replicas up", timeout=10_000
                )
                await expect(page.locator("#replicas tr")).to_have_count(2)
                await expect(page.locator("#replicas")).to_contain_text("A (this one)")
                await expect(page.locator("[data-testid=store-warning]")).to_have_text("")
                redis.stop()
                await expect(page.locator("[data-testid=store-warning]")).to_contain_text(
                    "shared state unreachable", timeout=10_000
                )
                redis.start()
                await expect(page.locator("[data-testid=store-warning]")).to_have_text("", timeout=10_000)
            finally:
                await browser.close()
