"""Two replicas on one real Redis (Debian's redis-server, started here on a loopback port) behave, to a
client, like one balancer: one fleet, one count of slots in flight, one memory of sessions and prompts,
shared counters; the snapshot names each replica and lists the others."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmbalancer.reloading import ConfigSource
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.redis_support import running_redis, two_replicas
from tests.support import RunningBalancer, get_json, run_balancer, wait_for

CHAT = "/v1/chat/completions"


def _body(text: str, max_tokens: int = 4) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


async def _chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any], session: str | None = None) -> str:
    """The backend that served the request (from the balancer's recent requests: the reply does not say)."""
    headers = {"X-Session-ID": session} if session else {}
    async with http.post(url + CHAT, json=body, headers=headers) as reply:
        assert reply.status == 200, await reply.text()
        await reply.read()
        return reply.headers.get("X-Request-Id", "")


def _served_by(balancer: RunningBalancer) -> str | None:
    newest = balancer.components.recent.newest_first()
    return newest[0].backend if newest else None


async def test_a_sticky_session_pinned_by_one_replica_is_honoured_by_the_other(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis:
        async with (
            run_fake_fleet(3) as fakes,
            two_replicas(redis, [f"{f.url}={n}" for f, n in zip(fakes, "xyz", strict=True)],
                         **{"policy.name": "sticky"}) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            for session in ("alice", "bob", "carol", "dave"):
                await _chat(http, a.url, _body("hello"), session)
                await wait_for(lambda: a.components.recent.observed > 0)
                pinned = _served_by(a)
                assert pinned is not None
                await wait_for(lambda s=session, p=pinned: _pin(b, s) == p, timeout=2)
                for _ in range(3):
                    before = b.components.recent.observed
                    await _chat(http, b.url, _body("and again"), session)
                    await wait_for(lambda n=before: b.components.recent.observed > n)
                    assert _served_by(b) == pinned, f"session {session} pinned to {pinned} on A"


def _pin(balancer: RunningBalancer, session: str) -> str | None:
    from llmbalancer.scheduling.selectors import RequestFacts
    from llmbalancer.scheduling.selectors.sticky import Sticky

    selector = balancer.components.dispatcher.selector
    assert isinstance(selector, Sticky)
    return selector.pinned(RequestFacts("POST", CHAT, "127.0.0.1", {"X-Session-ID": session}, model="smollm2"))


async def test_a_follow_up_on_the_other_replica_goes_to_the_server_holding_its_prefix(tmp_path: Path) -> None:
    system = "You are a careful assistant. " + " ".join(f"rule{i} applies here" for i in range(80))
    chats = [[{"role": "system", "content": f"{k} {system}"}, {"role": "user", "content": f"question {k}"}]
             for k in range(4)]
    with running_redis(tmp_path) as redis:
        async with (
            run_fake_fleet(3) as fakes,
            two_replicas(redis, [f"{f.url}={n}" for f, n in zip(fakes, "xyz", strict=True)],
                         **{"policy.name": "prefix"}) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            homes = []
            for messages in chats:
                await _chat(http, a.url, {"model": "smollm2", "messages": messages, "max_tokens": 4})
                await wait_for(lambda: _served_by(a) is not None)
                homes.append(_served_by(a))
            await asyncio.sleep(0.3)  # the placements travel to B
            for messages, home in zip(chats, homes, strict=True):
                follow_up = [*messages, {"role": "assistant", "content": "an answer"},
                             {"role": "user", "content": "and a follow-up question"}]
                before = b.components.recent.observed
                await _chat(http, b.url, {"model": "smollm2", "messages": follow_up, "max_tokens": 4})
                await wait_for(lambda n=before: b.components.recent.observed > n)
                assert _served_by(b) == home


async def test_a_backend_registered_on_one_replica_is_served_by_the_other_within_a_second(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis:
        async with (
            run_fake_fleet(2) as fakes,
            two_replicas(redis, [f"{fakes[0].url}=x"]) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            started = time.monotonic()
            async with http.post(a.url + "/admin/backends", json={"url": fakes[1].url, "name": "joined"}) as reply:
                assert reply.status == 201
            registry = b.components.registry
            await wait_for(lambda: (j := registry.get("joined")) is not None and j.routable, timeout=1.0)
            assert time.monotonic() - started < 1.0
            joined = registry.get("joined")
            assert joined is not None and joined.source == "api"
            # Served by B: the original backend is taken out of B's rotation, so only "joined" can answer.
            async with http.delete(b.url + "/admin/backends/x") as reply:
                assert reply.status == 202
            await wait_for(lambda: a.components.registry.get("x") is None, timeout=2)  # drained on A too
            before = fakes[1].stats["completed"]
            await _chat(http, b.url, _body("via the joined one"))
            assert _served_by(b) == "joined"
            assert fakes[1].stats["completed"] == before + 1


async def test_a_reload_on_one_replica_changes_the_fleet_of_both(tmp_path: Path) -> None:
    path = tmp_path / "llmbalancer.yaml"
    with running_redis(tmp_path) as redis:
        async with run_fake_fleet(3) as fakes:
            path.write_text(f"backends: [{fakes[0].url}=x, {fakes[1].url}=y]\n")
            sources = [
                ConfigSource(config_file=str(path), environ={}, overrides={
                    "logging.format": "json", "health.interval": 0.2, "state.url": redis.url, "state.replica": name,
                }) for name in "AB"
            ]
            async with (
                run_balancer(sources[0].load(), sources[0]) as a,
                run_balancer(sources[1].load(), sources[1]) as b,
                aiohttp.ClientSession() as http,
            ):
                path.write_text(f"backends: [{fakes[0].url}=x, {fakes[2].url}=z]\n")  # y out, z in
                async with http.post(a.url + "/admin/reload") as reply:
                    assert reply.status == 200, await reply.text()
                registry = b.components.registry
                await wait_for(lambda: registry.get("y") is None and registry.get("z") is not None, timeout=1.0)
                z = registry.get("z")
                assert z is not None and z.source == "config"
                async with http.post(b.url + "/admin/reload") as reply:  # the same file: nothing left to change
                    assert (await reply.json())["changes"] == []


async def test_an_agent_heartbeating_one_replica_is_served_by_both(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis:
        async with (
            run_fake_fleet(1) as fakes,
            two_replicas(redis, []) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            beat = {"url": fakes[0].url, "ready": True, "slots_total": 2, "slots_busy": 0, "models": ["smollm2"]}
            async with http.put(a.url + "/admin/agents/gpu7", json=beat) as reply:
                assert reply.status == 201
            await wait_for(lambda: (g := b.components.registry.get("gpu7")) is not None and g.routable, timeout=1.0)
            await _chat(http, b.url, _body("to the agent's server"))
            assert _served_by(b) == "gpu7"
            async with http.delete(a.url + "/admin/agents/gpu7") as reply:
                assert reply.status == 202
            await wait_for(lambda: b.components.registry.get("gpu7") is None, timeout=2)


async def test_counters_are_shared_by_the_replicas(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis:
        # A generous bound on Redis calls: on a loaded machine 100 at once could outlast the default 50 ms, and a
        # call that does falls back to local counts (by design), which is not what this test is about.
        async with run_fake_fleet(1) as fakes, two_replicas(redis, [fakes[0].url], **{"state.timeout": 2.0}) as (a, b):
            ca, cb = a.components.counters, b.components.counters
            totals = await asyncio.gather(*(c.incr("key:alice:requests", 1) for c in [ca, cb] * 50))
            assert sorted(totals) == list(range(1, 101))  # atomic: each addition saw every one before it
            assert await ca.get("key:alice:requests") == await cb.get("key:alice:requests") == 100
            assert await cb.incr("key:alice:tokens", 700, window_s=60) == 700
            assert await ca.incr("key:alice:tokens", 300, window_s=60) == 1000
            assert await ca.get("key:bob:tokens") == 0


async def test_two_replicas_never_hand_a_backend_more_requests_than_its_slots(tmp_path: Path) -> None:
    config = FakeLlamaConfig(slots=2, token_delay=0.01)
    with running_redis(tmp_path) as redis:
        async with (
            run_fake_fleet(3, config) as fakes,
            two_replicas(redis, [f"{f.url}={n}" for f, n in zip(fakes, "xyz", strict=True)],
                         **{"policy.name": "least_connections"}) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            targets = [a.url, b.url] * 20
            await asyncio.gather(*(_chat(http, url, _body(f"request {i}", 12)) for i, url in enumerate(targets)))
            for fake in fakes:
                assert fake.stats["max_processing"] == 2  # every slot used...
                assert fake.stats["max_deferred"] == 0  # ...and never one request more
            assert sum(f.stats["completed"] for f in fakes) == 40


async def test_the_snapshot_names_the_replica_and_lists_the_others(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis:
        async with (
            run_fake_fleet(1) as fakes,
            two_replicas(redis, [fakes[0].url], **{"state.address": "http://replica.example:8088"}) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            await asyncio.sleep(1.2)  # a heartbeat each
            snapshot = await get_json(http, a.url + "/llmhealth-snapshot")
            assert snapshot["replica"]["id"] == "A"
            assert snapshot["replica"]["address"] == "http://replica.example:8088"
            listed = {r["id"]: r for r in snapshot["replicas"]}
            assert set(listed) == {"A", "B"}
            assert listed["A"]["self"] and not listed["B"]["self"]
            assert listed["B"]["up"] and time.time() - listed["B"]["last_seen"] < 3
            assert snapshot["state_store"]["up"] is True
            assert snapshot["state_store"]["url"] == redis.url
            async with http.get(b.url + "/metrics") as reply:
                exposition = await reply.text()
            assert "llmbalancer_state_store_up 1.0" in exposition
            assert "llmbalancer_replicas_up 2.0" in exposition
