"""A request already waiting in the admission queue is served by a backend that joins, or whose models
become known, while it waits; with ``queue.wait_for_backends`` a request that finds no backend at all waits."""

from __future__ import annotations

import asyncio

import pytest

from llmbalancer.config import QueueConfig
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend, BackendState, Health
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.selectors import RequestFacts
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from tests.support import occupy


def _facts(model: str) -> RequestFacts:
    return RequestFacts("POST", "/v1/chat/completions", "127.0.0.1", model=model, body={"model": model})


def _healthy(registry: Registry, backend: Backend) -> Backend:
    registry.add(backend)
    registry.set_state(backend, BackendState.HEALTHY)
    return backend


async def test_a_waiting_request_takes_a_backend_whose_models_become_known_while_it_waits() -> None:
    registry = Registry()
    full = _healthy(registry, Backend("full", "http://full", max_concurrency=1, models=("x",)))
    # Known to serve nothing yet (its model list not discovered): while another backend is known to serve
    # "x", it is not one of the request's candidates.
    newcomer = _healthy(registry, Backend("newcomer", "http://newcomer", max_concurrency=1, models=()))
    newcomer.health = Health(served_models=("y",))
    dispatcher = Dispatcher(registry, SlotAware(), QueueConfig(timeout=5))
    with occupy(registry, full):
        waiting = asyncio.create_task(dispatcher.claim(_facts("x")))
        await asyncio.sleep(0.05)
        assert not waiting.done() and dispatcher.queue_depth == 1
        newcomer.health.served_models = ("y", "x")  # what the poller writes when it discovers them
        registry.models_changed()
        claim = await asyncio.wait_for(waiting, 1)
        assert claim.backend is newcomer
        claim.release()


async def test_a_waiting_request_takes_a_backend_that_joins_while_it_waits() -> None:
    registry = Registry()
    full = _healthy(registry, Backend("full", "http://full", max_concurrency=1))
    dispatcher = Dispatcher(registry, SlotAware(), QueueConfig(timeout=5))
    with occupy(registry, full):
        waiting = asyncio.create_task(dispatcher.claim(_facts("x")))
        await asyncio.sleep(0.05)
        joined = registry.add(Backend("joined", "http://joined", max_concurrency=1, source="api"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # starting: not before its first good probe
        registry.set_state(joined, BackendState.HEALTHY)
        claim = await asyncio.wait_for(waiting, 1)
        assert claim.backend is joined
        claim.release()


async def test_without_wait_for_backends_no_backend_at_all_is_503_at_once() -> None:
    dispatcher = Dispatcher(Registry(), SlotAware(), QueueConfig(timeout=5))
    with pytest.raises(ProxyError) as caught:
        await asyncio.wait_for(dispatcher.claim(_facts("x")), 1)
    assert caught.value.status == 503


async def test_with_wait_for_backends_a_request_waits_for_the_first_backend_to_register() -> None:
    registry = Registry()
    dispatcher = Dispatcher(registry, SlotAware(), QueueConfig(timeout=5, wait_for_backends=True))
    waiting = asyncio.create_task(dispatcher.claim(_facts("x")))
    await asyncio.sleep(0.1)
    assert not waiting.done() and dispatcher.queue_depth == 1  # the depth an autoscaler scales on
    first = _healthy(registry, Backend("first", "http://first", source="agent"))
    claim = await asyncio.wait_for(waiting, 1)
    assert claim.backend is first
    claim.release()

    dispatcher = Dispatcher(Registry(), SlotAware(), QueueConfig(timeout=0.2, wait_for_backends=True))
    with pytest.raises(ProxyError) as caught:
        await dispatcher.claim(_facts("x"))
    assert caught.value.status == 504 and caught.value.code == "queue_timeout"


async def test_a_waiting_request_never_takes_a_backend_removed_while_it_waits() -> None:
    registry = Registry()
    leaving = _healthy(registry, Backend("leaving", "http://leaving", max_concurrency=1))
    staying = _healthy(registry, Backend("staying", "http://staying", max_concurrency=1))
    dispatcher = Dispatcher(registry, SlotAware(), QueueConfig(timeout=5))
    on_leaving, on_staying = occupy(registry, leaving), occupy(registry, staying)
    waiting = asyncio.create_task(dispatcher.claim(_facts("x")))
    await asyncio.sleep(0.05)
    registry.remove("leaving")
    on_leaving.release()  # its slot frees as it drains: not for the request waiting
    await asyncio.sleep(0.05)
    assert not waiting.done() and registry.get("leaving") is None
    on_staying.release()
    claim = await asyncio.wait_for(waiting, 1)
    assert claim.backend is staying
    claim.release()
