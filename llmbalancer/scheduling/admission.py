"""The admission queue: bounded, per model, served by priority, then fair share among keys (or clients), then
arrival order (``fairness.py``).

The queue only orders waiters; it does not pick backends. A waiter at the head of its model's
queue binds to a backend when a slot frees (the dispatcher checks on every registry change), so a
request queued while every server was full goes to whichever frees first, not to the one that
looked best when it arrived.

A waiter may be *held* for one backend (a cache-aware policy's ``hold_for``): it waits for that backend
alone, so it does not stand in the way of the waiters behind it, which may take any other server; only
waiters held for the same backend queue behind it. Held waiters still count in the depth.

A *retry* (a request whose first backend failed before any byte reached the client) has had its turn:
it takes any free slot it may use as soon as one frees, and never stands in the way of the waiters
behind it (it may not use the backend it failed on, which they may).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmbalancer import errors
from llmbalancer.scheduling.fairness import FairShare, asked_priority, fair_sort_key

if TYPE_CHECKING:
    from llmbalancer.fleet.backend import Backend


@dataclass(eq=False, slots=True)
class Waiter:
    model: str
    priority: int
    seq: int
    sort_key: tuple[int, float, int] = field(init=False)
    held_for: Backend | None = None  # waiting for this backend only (until the dispatcher clears it)
    retry: bool = False
    since: float = field(default_factory=time.time)  # when it began waiting (Unix seconds)
    start: float = 0.0  # its fair-share start tag (fairness.py)
    tenant: str = ""  # whose share it takes: its key's name, else its client's address

    def __post_init__(self) -> None:
        self.sort_key = fair_sort_key(self.priority, self.start, self.seq)


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

    def head(self, model: str, leaving: Waiter | None = None) -> Waiter | None:
        """The first in line for any backend (not held, not a retry) for ``model``, ``leaving`` left out."""
        return next(
            (w for w in self._queues.get(model, ()) if w is not leaving and not w.retry and w.held_for is None), None
        )

    def may_claim(self, waiter: Waiter) -> bool:
        """A retry, or first in line for what it waits for: no waiter ahead of it (retries aside) waits for
        the same (held: any backend, unheld: the one it is held for)."""
        if waiter.retry:
            return True
        for ahead in self._queues.get(waiter.model, ()):
            if ahead is waiter:
                return True
            if not ahead.retry and (ahead.held_for is None or ahead.held_for is waiter.held_for):
                return False
        return False

    def waiting(self, model: str, priority: int, retry: bool = False, tenant: str = "") -> _Place:
        """Hold a place in ``model``'s queue for a ``with`` block (``tenant``: whose share it takes); raises 503
        ``queue_full`` when there is none."""
        queue = self._queues.setdefault(model, [])
        if len(queue) >= self.max_size:
            raise errors.queue_full(len(queue))
        start = self.fair.start_tag(model, tenant, priority, queue)
        waiter = Waiter(model, priority, next(self._seq), retry=retry, start=start, tenant=tenant)
        bisect.insort(queue, waiter, key=lambda w: w.sort_key)
        return _Place(self, waiter)

    def _leave(self, waiter: Waiter) -> None:
        queue = self._queues.get(waiter.model)
        if queue is not None:
            queue.remove(waiter)
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
        self._queue._leave(self.waiter)


def priority_of(headers: Mapping[str, str]) -> int:
    """``X-Priority: N`` (higher is served first); absent or unreadable means 0. A keyed request's priority is
    ``fairness.priority_for``'s."""
    return asked_priority(headers) or 0
