"""Idle capacity first, users first: when a batch line may take a slot, and on which backends.

Batch lines go through the same claim protocol as interactive requests, below every one of them:

- no line starts while any interactive request waits in the admission queue (the runner asks
  ``Dispatcher.queue_depth`` first), so a user waits behind batch work for at most one line already
  running;
- a backend takes a line only while it has a free slot (``Dispatcher.eligible``) and, by default,
  never its *last* free slot: at least two free, so that one stays open for the next interactive
  request (a one-slot server takes none); ``batch.max_in_flight`` replaces that rule with a plain cap
  on the lines each backend runs at once (a backend whose slot count is unknown runs one line at most
  unless it is set).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.capacity import capacity, free_slots


class BatchGate:
    def __init__(self, max_in_flight: int | None) -> None:
        self.max_in_flight = max_in_flight
        self.held: Counter[str] = Counter()  # batch lines in flight, by backend name

    def admits(self, backend: Backend) -> bool:
        """May one more line go to ``backend`` (already known to have a free slot)?"""
        held = self.held[backend.name]
        if self.max_in_flight is not None:
            return held < self.max_in_flight
        free = free_slots(backend)
        if free is None:
            return held < 1
        return free >= 2

    def open_to(self, backends: Iterable[Backend]) -> list[Backend]:
        return [b for b in backends if self.admits(b)]

    def take(self, backend: Backend) -> None:
        self.held[backend.name] += 1

    def give_back(self, backend: Backend) -> None:
        self.held[backend.name] -= 1
        if self.held[backend.name] <= 0:
            del self.held[backend.name]

    @property
    def total(self) -> int:
        return sum(self.held.values())

    def limit(self, backend: Backend) -> int | None:
        """The most lines ``backend`` could run at once with nothing else on it (None: unknown)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        total = capacity(backend)
        return 1 if total is None else max(0, total - 1)
