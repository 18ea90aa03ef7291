"""The monitor shows each active batch with its progress, in headless Chromium (as test_monitor_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.batch_support import chat_line, client_for, jsonl, wait_completed, wait_status
from tests.support import make_config, run_balancer
from tests.test_monitor_browser import ARTIFACTS, CHROMIUM, LAUNCH_ARGS

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)


async def test_the_monitor_shows_a_running_batch_with_its_progress_and_rate(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    assert CHROMIUM is not None
    lines = [chat_line(f"m{i}", max_tokens=10, ignore_eos=True) for i in range(80)]
    async with (
        run_fake_fleet(2, FakeLlamaConfig(slots=3, token_delay=0.03)) as fakes,
        run_balancer(make_config([f.url for f in fakes], **{"batch.dir": str(tmp_path)})) as balancer,
        client_for(balancer.url) as client,
        async_playwright() as playwright,
    ):
        uploaded = await client.files.create(file=("m.jsonl", jsonl(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"priority": "2"},
        )
        await wait_completed(client, created.id, 4)
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 800})
            await page.goto(balancer.url + "/llmhealth-monitor")
            row = page.locator("[data-testid=batch-row]")
            await expect(row).to_have_count(1, timeout=10_000)
            await expect(row).to_have_attribute("data-status", "in_progress")
            await expect(row.locator(".name")).to_contain_text(created.id)
            await expect(row.locator(".name")).to_contain_text("priority 2")
            await expect(row.locator(".counts")).to_contain_text("of 80")
            await expect(row.locator(".counts")).to_contain_text("lines/s", timeout=10_000)
            await expect(row.locator(".counts")).to_contain_text("finishes in")
            width = await row.locator(".done").evaluate("node => parseFloat(node.style.width)")
            assert width > 0
            await expect(page.locator("#batch-slots")).to_contain_text("slots held by batch work")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "monitor-batches.png"), full_page=True)
            await wait_status(client, created.id, timeout=60)
            await expect(row).to_have_count(0, timeout=10_000)  # an ended batch leaves the list
        finally:
            await browser.close()
