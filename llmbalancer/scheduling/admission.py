"""The admission queue: per model, served by priority, then fair share among keys (or clients), then arrival
order (``fairness.py``), admitting by expected wait.

A request is refused (503 ``queue_full``, ``Retry-After`` the expected wait) only when it could not be
served in time: when the wait the dispatcher expects for it (``service_rate.py``: the waiters ahead of
it times the fleet's measured holding time, over its slots) exceeds ``timeout``, or when the model's
queue holds ``max_size`` waiters already (an explicit cap, a memory bound by default).

The queue only holds and orders waiters; binding them to freed slots is ``binding.py``'s, which takes a
bound waiter out of the queue at once (``take``) and hands it its claim through ``Waiter.bound``.

A waiter may be *held* for one backend (a cache-aware policy's ``hold_for``) until ``hold_until``: it
takes that backend only, and does not stand in the way of the waiters behind it. A *retry* (a request
whose first backend failed before any byte reached the client) has had its turn: it takes any free slot
it may use as soon as one frees.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmbalancer import errors
from llmbalancer.scheduling.fairness import FairShare, asked_priority, fair_sort_key

if TYPE_CHECKING:
    from llmbalancer.fleet.backend import Backend
    from llmbalancer.scheduling.claims import Claim
    from llmbalancer.scheduling.selectors import RequestFacts


@dataclass(eq=False, slots=True)
class Waiter:
    model: str
    priority: int
    seq: int
    sort_key: tuple[int, float, int] = field(init=False)
    retry: bool = False
    since: float = field(default_factory=time.time)  # when it began waiting (Unix seconds: replicas compare it)
    start: float = 0.0  # its fair-share start tag (fairness.py)
    tenant: str = ""  # whose share it takes: its key's name, else its client's address
    # Its age in line (loop time): when it joined, or, when fair share or priority put it ahead of waiters
    # already there, the time the one it passed joined; so ages fall along the queue, as its order does.
    joined: float = 0.0
    expected: float | None = None  # the wait expected for it when it joined (None: no estimate yet)
    # Set by the dispatcher once the waiter has its place:
    facts: RequestFacts | None = None
    excluded: Collection[Backend] = ()  # backends it may not take (other models', a retry's failed ones)
    route: str | None = None  # the model routing judges by: waiters with the same one may take the same backends
    bound: asyncio.Future[Claim] | None = None  # its claim, once bound (or why it never will be)
    held_for: Backend | None = None  # waiting for this backend only, until hold_until (loop time)
    hold_until: float = 0.0
    # Ageing: from this time on (loop time) it is bound first, to any free backend it may take.
    deadline: float = float("inf")

    def __post_init__(self) -> None:
        self.sort_key = fair_sort_key(self.priority, self.start, self.seq)

    @property
    def open(self) -> bool:
        """Still waiting to be bound (not bound, failed or abandoned)."""
        return self.bound is not None and not self.bound.done()


class AdmissionQueue:
    def __init__(self, max_size: int, timeout: float) -> None:
        self.max_size = max_size
        self.timeout = timeout
        self._queues: dict[str, list[Waiter]] = {}
        self._seq = itertools.count()
        self.fair = FairShare()

    def depth(self, model: str | None = None) -> int:
        if model is None:
            return sum(len(queue) for queue in self._queues.values())
        return len(self._queues.get(model, ()))

    def depths(self) -> dict[str, int]:
        return {model: len(queue) for model, queue in self._queues.items() if queue}

    def queues(self) -> Iterator[list[Waiter]]:
        """Each model's queue, in order (a snapshot of the models: binding may empty and drop one)."""
        return iter(list(self._queues.values()))

    def waiters(self) -> Iterator[Waiter]:
        return (waiter for queue in list(self._queues.values()) for waiter in list(queue))

    def head(self, model: str, leaving: Waiter | None = None) -> Waiter | None:
        """The first in line for any backend (not held, not a retry) for ``model``, ``leaving`` left out."""
        return next(
            (w for w in self._queues.get(model, ()) if w is not leaving and not w.retry and w.held_for is None), None
        )

    def waiting(
        self,
        model: str,
        priority: int,
        retry: bool = False,
        tenant: str = "",
        expected_wait: Callable[[int], float | None] | None = None,
        now: float = 0.0,
    ) -> _Place:
        """Hold a place in ``model``'s queue for a ``with`` block (``tenant``: whose share it takes; ``now``: loop
        time). Raises 503 ``queue_full`` when there is none: the queue is at ``max_size``, or (not for a retry,
        which was admitted once) the wait expected for it, ``expected_wait(waiters ahead of it)`` seconds (the
        dispatcher's estimate), exceeds ``timeout``."""
        queue = self._queues.get(model, [])
        start = self.fair.start_tag(model, tenant, priority, queue)
        seq = next(self._seq)
        key = fair_sort_key(priority, start, seq)
        ahead = bisect.bisect_left(queue, key, key=lambda w: w.sort_key)
        expected = expected_wait(ahead) if expected_wait is not None else None
        if len(queue) >= self.max_size:
            raise errors.queue_full(len(queue), expected)
        if not retry and expected is not None and expected > self.timeout:
            raise errors.queue_full(len(queue), expected, self.timeout)
        self.fair.joined(model, tenant, start)
        waiter = Waiter(model, priority, seq, retry=retry, start=start, tenant=tenant, joined=now, expected=expected)
        queue = self._queues.setdefault(model, queue)
        queue.insert(ahead, waiter)
        if ahead + 1 < len(queue):
            waiter.joined = min(now, queue[ahead + 1].joined)
        return _Place(self, waiter)

    def put_back(self, waiter: Waiter) -> None:
        """``waiter``, bound but refused (replicas: another took the slot first), waits again in its place."""
        queue = self._queues.setdefault(waiter.model, [])
        if not queue:
            self.fair.joined(waiter.model, waiter.tenant, waiter.start)
        bisect.insort(queue, waiter, key=lambda w: w.sort_key)

    def take(self, waiter: Waiter) -> None:
        """``waiter`` leaves the queue (bound to a slot, or leaving)."""
        queue = self._queues.get(waiter.model)
        if queue is None:
            return
        index = bisect.bisect_left(queue, waiter.sort_key, key=lambda w: w.sort_key)
        if index < len(queue) and queue[index] is waiter:
            del queue[index]
            if not queue:
                del self._queues[waiter.model]
                self.fair.forget(waiter.model)


class _Place:
    """A class, not ``@contextmanager``: the latter rewrites ``__traceback__`` of the (frozen) errors raised
    through it, which fails."""

    __slots__ = ("_queue", "waiter")

    def __init__(self, queue: AdmissionQueue, waiter: Waiter) -> None:
        self._queue = queue
        self.waiter = waiter

    def __enter__(self) -> Waiter:
        return self.waiter

    def __exit__(self, *exc_info: object) -> None:
        self._queue.take(self.waiter)


def priority_of(headers: Mapping[str, str]) -> int:
    """``X-Priority: N`` (higher is served first); absent or unreadable means 0. A keyed request's priority is
    ``fairness.priority_for``'s."""
    return asked_priority(headers) or 0
