"""Whose turn it is when the fleet is full: priority first, then a fair share among the *tenants* of equal
priority (a client key's name; without keys, the client's address), then arrival.

Fair share is start-time fair queueing, per model queue. Each tenant has a finish tag; a request joining
the queue gets the start tag ``max(virtual time, its tenant's finish tag)``, and its tenant's finish tag
becomes ``start + 1``. The virtual time is the start tag of the first waiter of the same priority (the next
one served at that priority; it never goes back). Waiters are ordered by ``fair_sort_key``:
``(-priority, start, arrival)``. So a tenant with a hundred requests waiting holds start tags a hundred
apart, and a tenant arriving with one request starts at the virtual time: it is served after at most one
waiting request of each other tenant, whatever their backlog. Round robin among tenants with a backlog,
first come first served for everyone when nobody has one (each start tag is the virtual time).

A model's tags are forgotten when its queue empties (no backlog: nothing to be fair about), and tenants
whose finish tag the virtual time has passed are dropped when many pile up, so memory is bounded by the
tenants with requests waiting.

The key's ``priority`` caps the client's ``X-Priority`` (``priority_for``): a request of a key queues at the
key's priority, or lower if the client asks.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmbalancer.scheduling.selectors import RequestFacts

_PRIORITY_BOUND = 1000
_MAX_TENANTS = 10_000  # per model queue, before the tenants with nothing waiting are dropped


def fair_sort_key(priority: int, start: float, seq: int) -> tuple[int, float, int]:
    """A waiter's place in its model's queue: higher priority first, then the earlier start tag (fair
    share), then arrival. The admission queue and the binding pass order waiters by this alone."""
    return (-priority, start, seq)


class Placed(Protocol):
    """What fair share reads of a waiter already in the queue."""

    @property
    def priority(self) -> int: ...
    @property
    def start(self) -> float: ...
    @property
    def sort_key(self) -> tuple[int, float, int]: ...


@dataclass(slots=True)
class _Clock:
    virtual: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)


class FairShare:
    """The start tags of one admission queue's models."""

    __slots__ = ("_clocks",)

    def __init__(self) -> None:
        self._clocks: dict[str, _Clock] = {}

    def start_tag(self, model: str, tenant: str, priority: int, queue: Sequence[Placed]) -> float:
        """The start tag a request of ``tenant`` joining ``model``'s ``queue`` (sorted by ``fair_sort_key``) would
        get; ``joined`` records it once the request does join (one refused at the door leaves no trace)."""
        clock = self._clocks.get(model)
        if clock is None:
            return 0.0  # an empty queue: everyone starts at zero
        first = fair_sort_key(priority, float("-inf"), -1)  # before every waiter of this priority
        index = bisect.bisect_left(queue, first, key=lambda w: w.sort_key)
        if index < len(queue) and queue[index].priority == priority and queue[index].start > clock.virtual:
            clock.virtual = queue[index].start
        return max(clock.virtual, clock.finish.get(tenant, 0.0))

    def joined(self, model: str, tenant: str, start: float) -> None:
        """A request of ``tenant`` joined ``model``'s queue with the start tag ``start`` (from ``start_tag``)."""
        clock = self._clocks.get(model)
        if clock is None:
            clock = self._clocks[model] = _Clock()
        finish = clock.finish
        finish[tenant] = start + 1.0
        if len(finish) > _MAX_TENANTS:
            virtual = clock.virtual
            for name in [n for n, tag in finish.items() if tag <= virtual]:
                del finish[name]
            if len(finish) > _MAX_TENANTS:
                finish.clear()
                finish[tenant] = start + 1.0

    def forget(self, model: str) -> None:
        """``model``'s queue emptied."""
        self._clocks.pop(model, None)

    def tenants(self, model: str) -> int:
        clock = self._clocks.get(model)
        return len(clock.finish) if clock is not None else 0


def tenant_of(facts: RequestFacts) -> str:
    """Whose share of the queue a request takes: its key's name, else its client's address."""
    return facts.tenant or facts.client


def priority_for(facts: RequestFacts) -> int:
    """The request's priority in the queue: ``X-Priority`` (higher first; absent or unreadable: 0), capped by
    its key's priority; a keyed request that asks nothing queues at its key's priority."""
    asked = asked_priority(facts.headers)
    cap = facts.priority_cap
    if cap is None:
        return asked or 0
    return cap if asked is None else min(asked, cap)


def asked_priority(headers: Mapping[str, str]) -> int | None:
    """``X-Priority: N`` as sent, bounded; None when absent or unreadable."""
    value = headers.get("X-Priority")
    if not value:
        return None
    try:
        return max(-_PRIORITY_BOUND, min(_PRIORITY_BOUND, int(value.strip())))
    except ValueError:
        return None


def keyed(facts: RequestFacts, tenant: str, priority_cap: int) -> RequestFacts:
    """``facts`` of a request made with a client key (made directly: ``dataclasses.replace`` costs twice as much,
    once per keyed request)."""
    return RequestFacts(
        facts.method, facts.path, facts.client, facts.headers, facts.model, facts.body, tenant, priority_cap
    )
