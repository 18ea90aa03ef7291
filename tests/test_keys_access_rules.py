"""Who may call the balancer's own routes: admin calls that came through a proxy, and /metrics and the snapshot
once client keys are configured (the monitor, in a real browser, asks for a token once per tab)."""

from __future__ import annotations

import aiohttp
import pytest

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.keys_support import ADMIN_TOKEN, CHAT, OBSERVER, TEAM_A, keyed_config
from tests.support import make_config, run_balancer
from tests.test_monitor_browser import CHROMIUM, LAUNCH_ARGS

KEYS = ({"name": "team-a", "key": TEAM_A}, {"name": "watcher", "key": OBSERVER, "observe": True})


@pytest.mark.parametrize("header", ["X-Forwarded-For", "X-Real-IP", "Forwarded"])
async def test_an_admin_call_through_a_proxy_is_refused_without_a_token_and_accepted_with_it(header: str) -> None:
    forwarded = {header: "for=203.0.113.7" if header == "Forwarded" else "203.0.113.7"}
    async with aiohttp.ClientSession() as session:
        async with run_balancer(make_config([])) as balancer:
            async with session.get(balancer.url + "/admin/backends", headers=forwarded) as reply:
                assert reply.status == 403
                error = (await reply.json())["error"]
                assert "admin.token" in error["message"] and header in error["message"]
            async with session.get(balancer.url + "/admin/backends") as reply:
                assert reply.status == 200  # loopback, not through a proxy: as before
        async with run_balancer(make_config([], **{"admin.token": ADMIN_TOKEN})) as balancer:
            bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with session.get(balancer.url + "/admin/backends", headers={**forwarded, **bearer}) as reply:
                assert reply.status == 200
            async with session.get(balancer.url + "/admin/backends", headers=forwarded) as reply:
                assert reply.status == 401


async def test_with_keys_metrics_and_the_snapshot_need_the_admin_token_or_an_observe_key() -> None:
    async with run_fake_llama() as fake:
        config = keyed_config([fake.url], *KEYS, **{"admin.token": ADMIN_TOKEN})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT,
                                    headers={"Authorization": f"Bearer {TEAM_A}"}) as reply:
                assert reply.status == 200
            for path in ("/metrics", "/llmhealth-snapshot"):
                for headers, status in (
                    ({}, 401), ({"Authorization": "Bearer nope-nope-nope"}, 401),
                    ({"Authorization": f"Bearer {TEAM_A}"}, 403), ({"Authorization": f"Bearer {OBSERVER}"}, 200),
                    ({"x-api-key": OBSERVER}, 200), ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, 200),
                ):
                    async with session.get(balancer.url + path, headers=headers) as reply:
                        assert reply.status == status, (path, headers, await reply.text())
            observer = {"Authorization": f"Bearer {OBSERVER}"}
            async with session.get(balancer.url + "/metrics", headers=observer) as reply:
                exposition = await reply.text()
            assert 'llmbalancer_key_requests_total{key="team-a",status="200"} 1.0' in exposition
            assert 'llmbalancer_key_in_flight{key="team-a"} 0.0' in exposition
            assert TEAM_A not in exposition
            async with session.get(balancer.url + "/llmhealth-snapshot", headers=observer) as reply:
                snapshot = await reply.json()
            assert snapshot["requests"][0]["key"] == "team-a"
            async with session.get(balancer.url + "/health") as reply:
                assert reply.status == 200  # liveness stays open
            async with session.get(balancer.url + "/llmhealth-monitor") as reply:
                assert reply.status == 200  # the page holds no data: it asks for a token


async def test_without_keys_metrics_and_the_snapshot_stay_open() -> None:
    async with run_balancer(make_config([])) as balancer, aiohttp.ClientSession() as session:
        for path in ("/metrics", "/llmhealth-snapshot"):
            async with session.get(balancer.url + path) as reply:
                assert reply.status == 200


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
async def test_the_monitor_asks_for_a_token_once_and_keeps_it_for_the_tab() -> None:
    from playwright.async_api import async_playwright, expect

    assert CHROMIUM is not None
    async with run_fake_llama() as fake, run_balancer(keyed_config([f"{fake.url}=alpha"], *KEYS)) as balancer, \
                aiohttp.ClientSession() as session:
        async with session.post(balancer.url + "/v1/chat/completions", json=CHAT,
                                headers={"Authorization": f"Bearer {TEAM_A}"}) as reply:
            assert reply.status == 200
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(balancer.url + "/llmhealth-monitor")
                form = page.locator("[data-testid=auth-form]")
                await expect(form).to_be_visible(timeout=10_000)
                await page.fill("#auth-token", TEAM_A)  # a key that may not observe
                await page.click("#auth button")
                await expect(form).to_be_visible(timeout=10_000)
                await expect(page.locator("#auth-why")).to_contain_text("refused")
                await page.fill("#auth-token", OBSERVER)
                await page.click("#auth button")
                await expect(page.locator("[data-testid=backend-row]")).to_have_count(1, timeout=10_000)
                await expect(form).to_be_hidden()
                await expect(page.locator("#requests tr").first).to_contain_text("team-a")
                assert await page.evaluate("sessionStorage.getItem('llmbalancer-monitor-token')") == OBSERVER
                await page.reload()  # the same tab: asked once
                await expect(page.locator("[data-testid=backend-row]")).to_have_count(1, timeout=10_000)
                await expect(form).to_be_hidden()
                other = await browser.new_page()  # another tab keeps nothing
                await other.goto(balancer.url + "/llmhealth-monitor")
                await expect(other.locator("[data-testid=auth-form]")).to_be_visible(timeout=10_000)
            finally:
                await browser.close()


async def test_a_backend_registered_over_the_admin_api_carries_its_api_key_and_never_shows_it() -> None:
    async with run_fake_llama() as fake, run_balancer(make_config([])) as balancer, aiohttp.ClientSession() as session:
        body = {"url": fake.url, "name": "locked", "api_key": "backend-secret-7"}
        async with session.post(balancer.url + "/admin/backends", json=body) as reply:
            assert reply.status == 201
            assert "backend-secret-7" not in await reply.text()
        async with session.get(balancer.url + "/admin/backends") as reply:
            assert "backend-secret-7" not in await reply.text()
        async with session.post(balancer.url + "/admin/backends",
                                json={"url": fake.url, "name": "env", "api_key_env": "HOME"}) as reply:
            assert reply.status == 400
            assert "api_key_env" in (await reply.json())["error"]["message"]
        locked = balancer.components.registry.get("locked")
        assert locked is not None and locked.api_key == "backend-secret-7"
        async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
            assert reply.status == 200
        seen = fake.stats["last_by_path"]["/v1/chat/completions"]["headers"]
        assert seen["authorization"] == "Bearer backend-secret-7"


async def test_llmbalancer_status_reads_the_snapshot_with_a_token_when_keys_are_configured() -> None:
    import asyncio

    from llmbalancer.status import StatusError, fetch_snapshot

    async with run_fake_llama() as fake, run_balancer(keyed_config([fake.url], *KEYS)) as balancer:
        snapshot = await asyncio.to_thread(fetch_snapshot, balancer.url, 5.0, OBSERVER)
        assert snapshot["backends"][0]["url"] == fake.url
        with pytest.raises(StatusError, match="401"):
            await asyncio.to_thread(fetch_snapshot, balancer.url, 5.0)
