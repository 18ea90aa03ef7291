"""Scheduling on real sockets against the project's fake llama-server: health states and the admission queue."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import aiohttp

from llmbalancer.fleet.backend import BackendState
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet, run_fake_llama
from tests.support import free_port, make_config, run_balancer, wait_for

CHAT = "/v1/chat/completions"


def chat(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    async with session.post(url + CHAT, json=body, headers=headers) as reply:
        return reply.status, await reply.json(content_type=None)


async def test_a_starting_backend_gets_no_traffic_until_healthy() -> None:
    async with (
        run_fake_llama(FakeLlamaConfig(load_time=1.0)) as loading,
        run_fake_llama() as ready,
        run_balancer(make_config([loading.url + "=loading", ready.url + "=ready"])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        registry = balancer.components.registry
        loading_backend = registry.get("loading")
        assert loading_backend is not None
        assert loading_backend.state is BackendState.STARTING
        for _ in range(4):
            status, _ = await post(session, balancer.url, chat())
            assert status == 200
        assert loading.stats["requests"].get(CHAT, 0) == 0
        await wait_for(lambda: loading_backend.state is BackendState.HEALTHY, timeout=10)
        for _ in range(4):
            await post(session, balancer.url, chat())
        assert loading.stats["requests"].get(CHAT, 0) > 0


async def test_a_request_waits_for_a_starting_backend_instead_of_failing() -> None:
    async with (
        run_fake_llama(FakeLlamaConfig(load_time=1.0)) as loading,
        run_balancer(make_config([loading.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        status, body = await post(session, balancer.url, chat())
        assert status == 200, body


def fake_process(port: int) -> subprocess.Popen[bytes]:
    """The fake as a process: killing it closes every socket, as a crashed llama-server's would."""
    return subprocess.Popen(
        [sys.executable, "-m", "llmbalancer.testing.fake_llama", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


async def test_a_dead_backend_is_ejected_within_three_intervals_and_comes_back() -> None:
    interval = 0.2
    port = free_port()
    process = fake_process(port)
    config = make_config([f"http://127.0.0.1:{port}=a"], **{"health.interval": interval, "health.window": 1.0})
    try:
        async with run_balancer(config) as balancer:
            backend = balancer.components.registry.get("a")
            assert backend is not None
            await wait_for(lambda: backend.state is BackendState.HEALTHY, timeout=10)
            stop_process(process)
            stopped = time.monotonic()
            await wait_for(lambda: backend.state is BackendState.UNHEALTHY, timeout=5)
            assert time.monotonic() - stopped <= 3 * interval + 0.5  # 0.5 s of slack for a busy machine
            process = fake_process(port)
            await wait_for(lambda: backend.state is BackendState.HEALTHY, timeout=10)
    finally:
        stop_process(process)


async def test_no_backend_alive_and_none_starting_is_503_at_once() -> None:
    async with run_fake_llama() as fake:
        url = fake.url
    async with run_balancer(make_config([url])) as balancer, aiohttp.ClientSession() as session:
        started = time.monotonic()
        status, body = await post(session, balancer.url, chat())
        assert status == 503 and body["error"]["code"] == "no_backend_available"
        assert time.monotonic() - started < 5  # not held for the queue timeout (30 s)


async def test_slots_are_never_exceeded_and_queued_requests_are_served_in_order() -> None:
    slow = FakeLlamaConfig(slots=1, token_delay=0.05, max_tokens_default=4)
    async with (
        run_fake_fleet(2, slow) as fakes,
        run_balancer(make_config([f.url for f in fakes])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        await wait_for(lambda: all(b.health.slots_total == 1 for b in balancer.components.registry), timeout=5)
        finished: list[int] = []

        async def one(index: int) -> None:
            status, body = await post(session, balancer.url, chat(f"request {index}"))
            assert status == 200, body
            finished.append(index)

        registry, dispatcher = balancer.components.registry, balancer.components.dispatcher
        tasks = []
        for index in range(6):
            tasks.append(asyncio.create_task(one(index)))
            # A known arrival order: each is in a slot or in the queue before the next is sent.
            await wait_for(
                lambda n=index + 1: sum(b.traffic.requests_total for b in registry) + dispatcher.queue_depth >= n,
                timeout=5,
            )
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        assert all(f.stats["max_processing"] <= 1 and f.stats["max_deferred"] == 0 for f in fakes)
        assert finished[2:] == sorted(finished[2:])  # the queued ones, in arrival order
        assert balancer.components.dispatcher.queue_depth == 0


async def test_higher_priority_is_served_first() -> None:
    slow = FakeLlamaConfig(slots=1, token_delay=0.05, max_tokens_default=4)
    async with (
        run_fake_llama(slow) as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        await wait_for(lambda: all(b.health.slots_total == 1 for b in balancer.components.registry), timeout=5)
        order: list[str] = []

        async def one(name: str, priority: int) -> None:
            status, _ = await post(session, balancer.url, chat(name), **{"X-Priority": str(priority)})
            assert status == 200
            order.append(name)

        first = asyncio.create_task(one("first", 0))
        await wait_for(lambda: fake.stats["processing"] == 1, timeout=5)
        low = asyncio.create_task(one("low", 0))
        await wait_for(lambda: balancer.components.dispatcher.queue_depth == 1, timeout=5)
        high = asyncio.create_task(one("high", 5))
        await wait_for(lambda: balancer.components.dispatcher.queue_depth == 2, timeout=5)
        await asyncio.wait_for(asyncio.gather(first, low, high), timeout=20)
        assert order == ["first", "high", "low"]


async def test_queue_overflow_is_503_and_queue_timeout_is_504() -> None:
    hold = FakeLlamaConfig(slots=1, token_delay=0.5, max_tokens_default=4)
    config = make_config([], **{"queue.max_size": 1, "queue.timeout": 0.5})
    async with run_fake_llama(hold) as fake:
        config = make_config([fake.url], **{"queue.max_size": 1, "queue.timeout": 0.5})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            await wait_for(lambda: all(b.health.slots_total == 1 for b in balancer.components.registry), timeout=5)
            running = asyncio.create_task(post(session, balancer.url, chat()))
            await wait_for(lambda: fake.stats["processing"] == 1, timeout=5)
            queued = asyncio.create_task(post(session, balancer.url, chat()))
            await wait_for(lambda: balancer.components.dispatcher.queue_depth == 1, timeout=5)
            async with session.post(balancer.url + CHAT, json=chat()) as reply:
                assert reply.status == 503 and reply.headers["Retry-After"]
                assert (await reply.json())["error"]["code"] == "queue_full"
            status, body = await asyncio.wait_for(queued, timeout=5)
            assert status == 504 and body["error"]["code"] == "queue_timeout"
            assert (await running)[0] == 200


async def test_a_client_that_disconnects_while_queued_leaves_the_queue() -> None:
    hold = FakeLlamaConfig(slots=1, token_delay=0.2, max_tokens_default=4)
    async with (
        run_fake_llama(hold) as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        dispatcher = balancer.components.dispatcher
        await wait_for(lambda: all(b.health.slots_total == 1 for b in balancer.components.registry), timeout=5)
        running = asyncio.create_task(post(session, balancer.url, chat()))
        await wait_for(lambda: fake.stats["processing"] == 1, timeout=5)
        queued = asyncio.create_task(post(session, balancer.url, chat()))
        await wait_for(lambda: dispatcher.queue_depth == 1, timeout=5)
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await wait_for(lambda: dispatcher.queue_depth == 0, timeout=5)
        assert (await running)[0] == 200
        # The one that left was never claimed, so never sent: a claim is the only way to a backend.
        assert balancer.components.registry.backends[0].traffic.requests_total == 1
        assert fake.stats["requests"][CHAT] == 1


async def test_sticky_sessions_stick_and_fail_over() -> None:
    async with (
        run_fake_fleet(3) as fakes,
        run_balancer(make_config([f"{f.url}=b{i}" for i, f in enumerate(fakes)], **{"policy.name": "sticky"})) as bal,
        aiohttp.ClientSession() as session,
    ):
        await wait_for(lambda: all(b.health.slots_total == 2 for b in bal.components.registry), timeout=5)
        for _ in range(5):
            assert (await post(session, bal.url, chat(), **{"X-Session-ID": "alice"}))[0] == 200
        served = [f for f in fakes if f.stats["requests"].get(CHAT)]
        assert len(served) == 1 and served[0].stats["requests"][CHAT] == 5
        await served[0].stop()
        for _ in range(3):
            assert (await post(session, bal.url, chat(), **{"X-Session-ID": "alice"}))[0] == 200
        now_served = [f for f in fakes if f.running and f.stats["requests"].get(CHAT)]
        assert len(now_served) == 1 and now_served[0].stats["requests"][CHAT] == 3


def conversation(turns: int, max_tokens: int = 4) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are a patient tutor who explains things slowly. " * 12}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn}: " + "tell me more about it " * 10})
        messages.append({"role": "assistant", "content": f"answer {turn}: " + "here is more about it " * 10})
    messages.append({"role": "user", "content": "and then?"})
    return {"model": "smollm2", "messages": messages, "max_tokens": max_tokens}


async def _follow_up_while_holder_busy(max_wait: float, blocker_tokens: int) -> tuple[int, list[int]]:
    """Turn 1 lands on one server; a long request with the same history keeps it full; then turn 2 is sent.
    Returns turn 2's ``timings.cache_n`` and the chat requests each fake served. Prefill is slow enough
    (5 ms a token) that the history's re-read (~1 s) is worth the blocker's ~0.5 s."""
    config = FakeLlamaConfig(slots=1, token_delay=0.05, prefill_per_token=0.005)
    async with (
        run_fake_fleet(2, config) as fakes,
        run_balancer(
            make_config([f.url for f in fakes], **{"policy.name": "prefix", "policy.prefix_max_wait": max_wait})
        ) as balancer,
        aiohttp.ClientSession() as session,
    ):
        await wait_for(lambda: all(b.health.slots_total == 1 for b in balancer.components.registry), timeout=5)
        status, _ = await post(session, balancer.url, conversation(1))
        assert status == 200
        blocker = asyncio.create_task(post(session, balancer.url, conversation(1, max_tokens=blocker_tokens)))
        await wait_for(lambda: any(b.traffic.in_flight for b in balancer.components.registry), timeout=5)
        status, body = await post(session, balancer.url, conversation(2))
        assert status == 200, body
        assert (await asyncio.wait_for(blocker, timeout=20))[0] == 200
        return body["timings"]["cache_n"], [f.stats["requests"].get(CHAT, 0) for f in fakes]


async def test_prefix_follow_up_waits_for_its_busy_server_when_it_frees_within_the_bound() -> None:
    cache_n, served = await _follow_up_while_holder_busy(max_wait=10.0, blocker_tokens=10)  # busy ~0.5 s
    assert sorted(served) == [0, 3]  # all three on the server holding the history
    assert cache_n > 100  # the history was not re-read


async def test_prefix_follow_up_goes_elsewhere_when_its_server_stays_busy_past_the_bound() -> None:
    cache_n, served = await _follow_up_while_holder_busy(max_wait=0.2, blocker_tokens=60)  # busy ~3 s
    assert sorted(served) == [1, 2]  # the follow-up went to the other, free server
    assert cache_n == 0  # which had never seen the history
