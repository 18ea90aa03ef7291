"""The admin API on real sockets: backends added, removed (drained) and replaced over HTTP, and who may call it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet, run_fake_llama
from tests.support import get_json, make_config, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TOKEN = "s3cret-admin-token"


def _chats(fake: Any) -> int:
    return int(fake.state.stats.requests.get("/v1/chat/completions", 0))


async def _backends(session: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    listed = await get_json(session, url + "/admin/backends")
    return {b["name"]: b for b in listed["backends"]}


async def test_a_backend_added_over_the_api_serves_the_next_request_once_healthy() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        body = {"url": fake.url, "name": "added", "max_concurrency": 4}
        registered = time.monotonic()
        async with session.post(balancer.url + "/admin/backends", json=body) as reply:
            assert reply.status == 201
            answer = await reply.json()
        assert answer["action"] == "added"
        assert answer["backend"]["source"] == "api" and answer["backend"]["state"] == "starting"
        async with session.post(balancer.url + "/admin/backends", json=body) as reply:
            assert reply.status == 200  # the same body again: nothing to do
            assert (await reply.json())["action"] == "unchanged"
        async with session.post(balancer.url + "/admin/backends", json={**body, "url": "http://127.0.0.1:9"}) as reply:
            assert reply.status == 409
            assert (await reply.json())["error"]["code"] == "conflict"

        backend = balancer.components.registry.get("added")
        assert backend is not None
        await wait_for(lambda: backend.routable, timeout=5)
        healthy_after = time.monotonic() - registered
        async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
            assert reply.status == 200
        assert _chats(fake) == 1
        assert healthy_after < 2.0  # probed at once, not at the poller's next sweep
        assert (await _backends(session, balancer.url))["added"]["state"] == "healthy"


async def test_a_removed_backends_in_flight_stream_finishes_while_new_requests_go_elsewhere() -> None:
    slow = FakeLlamaConfig(token_delay=0.05, max_tokens_default=40)
    async with (
        run_fake_fleet(2, slow) as (first, second),
        run_balancer(make_config([f"{first.url}=first"])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        registry = balancer.components.registry
        long_stream = {**CHAT, "stream": True, "max_tokens": 40, "ignore_eos": True}
        stream = await session.post(balancer.url + "/v1/chat/completions", json=long_stream)
        async with stream:
            assert stream.status == 200
            await stream.content.readline()  # the stream runs on `first`
            async with session.post(balancer.url + "/admin/backends", json={"url": second.url, "name": "second"}):
                pass
            await wait_for(lambda: (b := registry.get("second")) is not None and b.routable, timeout=5)
            async with session.delete(balancer.url + "/admin/backends/first") as reply:
                assert reply.status == 202
                assert (await reply.json())["draining"] is True
            assert (await _backends(session, balancer.url))["first"]["state"] == "draining"
            for _ in range(3):
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    assert reply.status == 200
            assert _chats(second) == 3 and _chats(first) == 1
            rest = await stream.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
        await wait_for(lambda: registry.get("first") is None, timeout=5)
        async with session.get(balancer.url + "/metrics") as reply:
            exposition = await reply.text()
        assert 'backend="first"' not in exposition and 'backend="second"' in exposition
        async with session.delete(balancer.url + "/admin/backends/first") as reply:
            assert reply.status == 404


async def test_put_makes_the_api_backends_exactly_the_list_and_leaves_other_sources_alone() -> None:
    async with (
        run_fake_fleet(3) as fakes,
        run_balancer(make_config([f"{fakes[0].url}=configured"])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        url = balancer.url + "/admin/backends"

        async def put(body: Any) -> tuple[int, Any]:
            async with session.put(url, json=body) as reply:
                return reply.status, await reply.json()

        status, answer = await put([{"url": fakes[1].url, "name": "a"}, {"url": fakes[2].url, "name": "b"}])
        assert status == 200
        assert [(c["action"], c["backend"]) for c in answer["changes"]] == [("added", "a"), ("added", "b")]
        status, answer = await put({"backends": [{"url": fakes[2].url, "name": "b", "models": ["smollm2"]},
                                                 {"url": fakes[1].url, "name": "c"}]})
        assert status == 200
        assert [(c["action"], c["backend"]) for c in answer["changes"]] == [
            ("updated", "b"), ("added", "c"), ("removed", "a"),
        ]
        assert answer["changes"][0]["changed"] == ["models"]
        registry = balancer.components.registry
        await wait_for(lambda: registry.get("a") is None, timeout=5)
        status, answer = await put([{"url": fakes[2].url, "name": "b", "models": ["smollm2"]},
                                    {"url": fakes[1].url, "name": "c"}])
        assert [c["action"] for c in answer["changes"]] == ["unchanged", "unchanged"]  # converged
        assert {b["name"] for b in answer["backends"]} == {"b", "c"}

        before = {b.name: b.url for b in registry}
        status, answer = await put([{"url": fakes[1].url, "name": "d"}, {"url": "ftp://nowhere", "name": "e"},
                                    {"url": fakes[1].url, "name": "d", "colour": "red"}])
        assert status == 400
        message = answer["error"]["message"]
        assert "backends[1].url: must be an http(s) URL" in message
        assert "backends[2].colour: unknown field" in message
        status, answer = await put([{"url": fakes[1].url, "name": "d"}, {"url": fakes[0].url, "name": "configured"}])
        assert status == 409 and "registered by config" in answer["error"]["message"]
        assert {b.name: b.url for b in registry} == before  # nothing half-applied
        assert registry.get("configured") is not None and registry.get("configured").source == "config"


async def test_bad_bodies_get_an_openai_style_400_naming_the_field() -> None:
    async with run_balancer(make_config([])) as balancer, aiohttp.ClientSession() as session:
        url = balancer.url + "/admin/backends"
        for body, expected in (
            (b"{not json", "not valid JSON"),
            (b'{"name": "x"}', "url: is required"),
            (b'{"url": "http://127.0.0.1:1", "max_concurrency": 0}', "max_concurrency: must be at least 1"),
            (b'{"url": "http://127.0.0.1:1", "kind": "gpu"}', "kind:"),
            (b'{"url": "http://127.0.0.1:1", "name": "a/b"}', "name: must be"),
            (b'[1, 2]', "must be a JSON object"),
        ):
            async with session.post(url, data=body) as reply:
                assert reply.status == 400, body
                error = (await reply.json())["error"]
                assert error["type"] == "invalid_request_error" and expected in error["message"], error
        assert len(balancer.components.registry) == 0


async def test_with_a_token_every_admin_route_requires_it_even_from_loopback_and_it_is_never_logged() -> None:
    with capture_logs() as logs:
        async with (
            run_balancer(make_config([], **{"admin.token": TOKEN})) as balancer,
            aiohttp.ClientSession() as session,
        ):
            for method, path in (("GET", "/admin/backends"), ("GET", "/admin/instances"), ("POST", "/admin/reload"),
                                 ("PUT", "/admin/agents/x"), ("DELETE", "/admin/backends/x")):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                {"Authorization": f"Basic {TOKEN}"}):
                    async with session.request(method, balancer.url + path, headers=headers) as reply:
                        assert reply.status == 401, (method, path, headers)
                        error = (await reply.json())["error"]
                        assert error["code"] == "invalid_admin_token" and TOKEN not in error["message"]
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(balancer.url + "/admin/backends", headers=bearer) as reply:
                assert reply.status == 200
            async with session.get(balancer.url + "/health") as reply:
                assert reply.status != 401  # not an admin route
            await asyncio.sleep(0)
    assert TOKEN not in repr(logs)
