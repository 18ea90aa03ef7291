"""The dispatcher with a shared slot ledger (replicas), against a ledger that refuses on cue: a claim another
replica took first is given back without a trace and the request chooses again, keeping its place in the
queue; a request cancelled while its claim is being admitted gives the slot back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llmbalancer.config import QueueConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.selectors import RequestFacts, Selector
from tests.support import occupy


class FirstListed(Selector):
    name = "first_listed"

    def __init__(self) -> None:
        self.learned: list[str] = []

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        return candidates[0]

    def claimed(self, backend: Backend, facts: RequestFacts) -> None:
        self.learned.append(backend.name)


class Ledger:
    """Refuses each backend named in ``taken`` once, as if another replica had just taken its last slot."""

    def __init__(self, taken: set[str], delay: float = 0.0) -> None:
        self.taken = taken
        self.delay = delay
        self.admits: list[str] = []
        self.released_names: list[str] = []
        self.heads: list[tuple[int, float] | None] = []
        self.older_elsewhere: float | None = None  # when another replica's first in line began waiting

    async def admit(self, backend: Backend) -> bool:
        self.admits.append(backend.name)
        await asyncio.sleep(self.delay)
        if backend.name in self.taken:
            self.taken.discard(backend.name)
            backend.in_flight_elsewhere = backend.max_concurrency or 0  # what the refusal tells: full here
            return False
        return True

    def released(self, backend: Backend) -> None:
        self.released_names.append(backend.name)

    def queue_head(self, model: str, head: tuple[int, float] | None) -> None:
        self.heads.append(head)

    def goes_first_elsewhere(self, model: str, priority: int, since: float) -> bool:
        return self.older_elsewhere is not None and self.older_elsewhere <= since


def _fleet(*names: str) -> Registry:
    registry = Registry()
    for name in names:
        backend = registry.add(Backend(name, f"http://{name}", max_concurrency=1))
        registry.set_state(backend, BackendState.HEALTHY)
    return registry


def _facts() -> RequestFacts:
    return RequestFacts("POST", "/v1/chat/completions", "127.0.0.1", model="m", body={"model": "m"})


async def test_a_claim_another_replica_took_first_leaves_no_trace_and_the_request_goes_elsewhere() -> None:
    registry = _fleet("a", "b")
    selector = FirstListed()
    dispatcher = Dispatcher(registry, selector, QueueConfig(timeout=5))
    dispatcher.ledger = ledger = Ledger({"a"})
    claim = await dispatcher.claim(_facts())
    a, b = registry.get("a"), registry.get("b")
    assert a is not None and b is not None
    assert claim.backend is b
    assert ledger.admits == ["a", "b"]
    assert selector.learned == ["b"]  # the policy never learned of the refused placement
    assert a.traffic.in_flight == 0 and ledger.released_names == ["a"]
    claim.release()
    assert b.traffic.in_flight == 0


async def test_a_queued_request_refused_keeps_its_place_and_takes_the_next_slot() -> None:
    registry = _fleet("a", "b")
    a, b = registry.get("a"), registry.get("b")
    assert a is not None and b is not None
    dispatcher = Dispatcher(registry, FirstListed(), QueueConfig(timeout=5))
    dispatcher.ledger = Ledger({"b"})
    with occupy(registry, a), occupy(registry, b) as holding_b:
        first = asyncio.create_task(dispatcher.claim(_facts()))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(dispatcher.claim(_facts()))
        await asyncio.sleep(0.02)
        holding_b.release()  # b frees here, but another replica takes it first: refused
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done() and dispatcher.queue_depth == 2
        b.in_flight_elsewhere = 0  # the other replica's request on b ends
        registry.notify_change()
        claim = await asyncio.wait_for(first, 1)  # the first in line, still first
        assert claim.backend is b and not second.done()
        claim.release()
        got = await asyncio.wait_for(second, 1)
        assert got.backend is b
        got.release()


async def test_a_request_cancelled_while_its_claim_is_admitted_gives_the_slot_back() -> None:
    registry = _fleet("a")
    a = registry.get("a")
    assert a is not None
    dispatcher = Dispatcher(registry, FirstListed(), QueueConfig(timeout=5))
    dispatcher.ledger = Ledger(set(), delay=1.0)
    waiting = asyncio.create_task(dispatcher.claim(_facts()))
    await asyncio.sleep(0.05)
    assert a.traffic.in_flight == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert a.traffic.in_flight == 0


async def test_a_free_slot_is_left_to_an_older_request_queued_on_another_replica_for_a_moment() -> None:
    registry = _fleet("a")
    a = registry.get("a")
    assert a is not None
    dispatcher = Dispatcher(registry, FirstListed(), QueueConfig(timeout=5))
    dispatcher.ledger = ledger = Ledger(set())
    with occupy(registry, a) as holding:
        waiting = asyncio.create_task(dispatcher.claim(_facts()))
        await asyncio.sleep(0.02)
        assert ledger.heads and ledger.heads[-1] is not None  # told: first in line here
        ledger.older_elsewhere = 0.0  # another replica's first in line has waited longer
        loop = asyncio.get_running_loop()
        freed = loop.time()
        holding.release()
        await asyncio.sleep(0.02)
        assert not waiting.done()  # left to the other replica's...
        claim = await asyncio.wait_for(waiting, 1)  # ...for a moment only: it did not take it
        assert 0.04 <= loop.time() - freed < 0.5
        assert ledger.heads[-1] is None  # nobody in line here any more
        claim.release()


async def test_a_new_request_does_not_jump_ahead_of_one_queued_on_another_replica() -> None:
    registry = _fleet("a")
    dispatcher = Dispatcher(registry, FirstListed(), QueueConfig(timeout=5))
    dispatcher.ledger = ledger = Ledger(set())
    ledger.older_elsewhere = 0.0
    waiting = asyncio.create_task(dispatcher.claim(_facts()))
    await asyncio.sleep(0.01)
    assert not waiting.done() and dispatcher.queue_depth == 1  # queued, though a slot is free
    ledger.older_elsewhere = None  # the other replica's request took its slot elsewhere
    registry.notify_change()
    claim = await asyncio.wait_for(waiting, 1)
    claim.release()
