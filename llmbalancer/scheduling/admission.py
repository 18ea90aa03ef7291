"""The admission queue: per model, served by priority then arrival order, admitting by expected wait.

A request is refused (503 ``queue_full``, ``Retry-After`` the expected wait) only when it could not be
served in time: when the wait the dispatcher expects for it (``service_rate.py``: the waiters ahead of
it times the fleet's measured holding time, over its slots) exceeds ``timeout``, or when the model's
queue holds ``max_size`` waiters already (an explicit cap, a memory bound by default).

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmbalancer import errors

if TYPE_CHECKING:
    from llmbalancer.fleet.backend import Backend


@dataclass(eq=False, slots=True)
class Waiter:
    model: str
    priority: int
    seq: int
    sort_key: tuple[int, int] = field(init=False)
    held_for: Backend | None = None  # waiting for this backend only (until the dispatcher clears it)
    retry: bool = False

    def __post_init__(self) -> None:
        self.sort_key = (-self.priority, self.seq)  # higher priority first, then arrival


class AdmissionQueue:
    def __init__(self, max_size: int, timeout: float) -> None:
        self.max_size = max_size
        self.timeout = timeout
        self._queues: dict[str, list[Waiter]] = {}
        self._seq = itertools.count()

    def depth(self, model: str | None = None) -> int:
        if model is None:
            return sum(len(queue) for queue in self._queues.values())
        return len(self._queues.get(model, ()))

    def depths(self) -> dict[str, int]:
        return {model: len(queue) for model, queue in self._queues.items() if queue}

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

    def ahead(self, model: str, priority: int) -> int:
        """Waiters a new request of ``priority`` would have before it in ``model``'s queue."""
        queue = self._queues.get(model)
        if not queue:
            return 0
        return bisect.bisect_right(queue, (-priority, 1 << 62), key=lambda w: w.sort_key)

    def waiting(
        self, model: str, priority: int, retry: bool = False, expected_wait: float | None = None
    ) -> _Place:
        """Hold a place in ``model``'s queue for a ``with`` block; raises 503 ``queue_full`` when there is none:
        the queue is at ``max_size``, or (not for a retry, which was admitted once) ``expected_wait`` seconds,
        the dispatcher's estimate for this request, exceed ``timeout``."""
        queue = self._queues.get(model, ())
        if len(queue) >= self.max_size:
            raise errors.queue_full(len(queue), expected_wait)
        if not retry and expected_wait is not None and expected_wait > self.timeout:
            raise errors.queue_full(len(queue), expected_wait, self.timeout)
        queue = self._queues.setdefault(model, [])
        waiter = Waiter(model, priority, next(self._seq), retry=retry)
        bisect.insort(queue, waiter, key=lambda w: w.sort_key)
        return _Place(self, waiter)

    def _leave(self, waiter: Waiter) -> None:
        queue = self._queues.get(waiter.model)
        if queue is not None:
            queue.remove(waiter)
            if not queue:
                del self._queues[waiter.model]


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
    """``X-Priority: N`` (higher is served first); absent or unreadable means 0."""
    value = headers.get("X-Priority")
    if not value:
        return 0
    try:
        return max(-1000, min(1000, int(value.strip())))
    except ValueError:
        return 0
