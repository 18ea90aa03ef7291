"""Overload is queued, not refused: a request gets 503 ``queue_full`` only when it could not be served in time."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from llmbalancer.config import QueueConfig
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.selectors import RequestFacts
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from llmbalancer.scheduling.service_rate import ServiceRate
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.support import make_config, occupy, run_balancer, wait_for

CHAT = "/v1/chat/completions"


async def test_a_burst_of_clients_far_beyond_the_slots_is_queued_and_every_one_served() -> None:
    # 160 concurrent streams on 4 slots: 156 wait (the old default cap was 100), each for well under queue.timeout.
    config = FakeLlamaConfig(slots=2, token_delay=0.002, max_tokens_default=4)
    async with (
        run_fake_fleet(2, config) as fakes,
        run_balancer(make_config([f.url for f in fakes])) as balancer,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        await wait_for(lambda: all(b.health.slots_total == 2 for b in balancer.components.registry), timeout=5)

        async def one(index: int) -> int:
            body = {"model": "smollm2", "messages": [{"role": "user", "content": f"hi {index}"}], "stream": True}
            async with session.post(balancer.url + CHAT, json=body) as reply:
                await reply.read()
                return reply.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(160))), timeout=60)
        assert statuses == [200] * 160
        assert all(f.stats["max_processing"] <= 2 and f.stats["max_deferred"] == 0 for f in fakes)


def _one_slot_fleet(timeout: float) -> tuple[Dispatcher, Backend]:
    registry = Registry()
    backend = Backend(name="a", url="http://a", state=BackendState.HEALTHY)
    backend.health.slots_total = 1
    registry.add(backend)
    return Dispatcher(registry, SlotAware(), QueueConfig(timeout=timeout)), backend


def _facts(**headers: str) -> RequestFacts:
    return RequestFacts("POST", CHAT, "test", headers, "m", {"model": "m"})


async def test_a_request_is_refused_only_when_its_expected_wait_exceeds_the_queue_timeout() -> None:
    dispatcher, backend = _one_slot_fleet(timeout=5.0)
    for _ in range(3):
        dispatcher.rate.completed("m", 2.0)  # a request holds the one slot 2 s
    with occupy(dispatcher.registry, backend):
        first = asyncio.create_task(dispatcher.claim(_facts()))  # expects 2 s
        second = asyncio.create_task(dispatcher.claim(_facts()))  # expects 4 s
        await wait_for(lambda: dispatcher.queue_depth == 2)
        with pytest.raises(ProxyError) as refused:
            await dispatcher.claim(_facts())  # would expect 6 s > 5 s
        assert refused.value.status == 503 and refused.value.code == "queue_full"
        assert refused.value.retry_after == 6  # the expected wait, not a constant
        # A request of higher priority goes ahead of both: it expects 2 s and is admitted.
        urgent = asyncio.create_task(dispatcher.claim(_facts(**{"X-Priority": "5"})))
        await wait_for(lambda: dispatcher.queue_depth == 3)
        for task in (first, second, urgent):
            task.cancel()
        await asyncio.gather(first, second, urgent, return_exceptions=True)


async def test_max_size_stays_an_explicit_cap_whose_retry_after_is_the_expected_wait() -> None:
    registry = Registry()
    backend = registry.add(Backend(name="a", url="http://a", state=BackendState.HEALTHY))
    backend.health.slots_total = 2
    dispatcher = Dispatcher(registry, SlotAware(), QueueConfig(max_size=1, timeout=60.0))
    dispatcher.rate.completed("m", 3.0)
    with occupy(registry, backend), occupy(registry, backend):
        queued = asyncio.create_task(dispatcher.claim(_facts()))
        await wait_for(lambda: dispatcher.queue_depth == 1)
        with pytest.raises(ProxyError) as refused:
            await dispatcher.claim(_facts())
        assert refused.value.code == "queue_full" and refused.value.retry_after == 3  # (1 ahead + 1) x 3 s / 2 slots
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)


def test_the_service_rate_estimates_the_wait_from_holding_times_per_model_with_the_fleets_as_fallback() -> None:
    rate = ServiceRate(weight=0.5)
    assert rate.expected_wait("m", ahead=3, slots=4) is None  # nothing learned yet
    rate.completed("m", 2.0)
    rate.completed("m", 4.0)
    assert rate.holding_time("m") == 3.0
    assert rate.expected_wait("m", ahead=3, slots=4) == 3.0  # (3 + 1) x 3 s / 4 slots
    assert rate.expected_wait("other", ahead=0, slots=1) == rate.holding_time("other") == 3.0
    assert rate.expected_wait("m", ahead=0, slots=0) is None
    bounded = ServiceRate(max_models=2)
    for name in ("a", "b", "c"):
        bounded.completed(name, 1.0)
    assert len(bounded._held) == 2
