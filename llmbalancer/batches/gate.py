"""Idle capacity first, users first: when a batch line may take a slot, and on which backends.

Batch lines go through the same claim protocol as interactive requests, below every one of them:

- no line starts while any interactive request waits in the admission queue (the runner asks
  ``Dispatcher.queue_depth`` first);
- a backend takes a line only while it has a free slot (``Dispatcher.eligible``) and keeps some free
  for the users who may come: by default never its *last* free slot (a one-slot server takes none);
  ``batch.max_in_flight`` caps the lines each backend runs at once instead (a backend whose slot
  count is unknown runs one line at most unless it is set);
- while users are arriving, more is kept free: enough that the users arriving during one batch line
  (the time a slot taken by batch work may take to come back) find a free slot 999 times in 1000
  (``Demand``). Measured on a simulated fleet (bench/batches.py), one slot per server alone let users
  who came in a burst wait for a whole line: batch lines of equal length started together end together.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.capacity import free_slots

WINDOW_S = 10.0  # interactive arrivals are counted over this long
SAMPLE_S = 0.25  # at most one sample of the arrival count per this long
QUANTILE = 0.999
_EWMA_WEIGHT = 0.1


class Demand:
    """Interactive arrivals per second over the last ``WINDOW_S``, and the free slots they need."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self.rate = 0.0
        self.line_seconds: float | None = None  # a batch line's slot time, moving average

    def observe(self, now: float, arrivals_total: int) -> None:
        """``arrivals_total``: interactive requests claimed so far (a counter that only grows)."""
        samples = self._samples
        if samples and now - samples[-1][0] < SAMPLE_S:
            return
        samples.append((now, arrivals_total))
        while len(samples) > 2 and samples[1][0] <= now - WINDOW_S:
            samples.popleft()
        first_time, first_count = samples[0]
        if now - first_time >= SAMPLE_S:
            self.rate = max(0, arrivals_total - first_count) / (now - first_time)

    def line_took(self, seconds: float) -> None:
        previous = self.line_seconds
        self.line_seconds = seconds if previous is None else previous + _EWMA_WEIGHT * (seconds - previous)

    def headroom(self) -> int:
        """Free slots, fleet-wide, for the users arriving while a batch line runs (0 when none arrive)."""
        if not self.rate or not self.line_seconds:
            return 0
        return poisson_quantile(self.rate * self.line_seconds, QUANTILE)


def poisson_quantile(mean: float, q: float) -> int:
    """The least k with P(X <= k) >= q for X ~ Poisson(mean)."""
    if mean <= 0:
        return 0
    if mean > 500:  # the normal approximation; the sum below would underflow
        return math.ceil(mean + 3.1 * math.sqrt(mean))
    term = total = math.exp(-mean)
    k = 0
    while total < q:
        k += 1
        term *= mean / k
        total += term
    return k


class BatchGate:
    def __init__(self, max_in_flight: int | None) -> None:
        self.max_in_flight = max_in_flight
        self.held: Counter[str] = Counter()  # batch lines in flight, by backend name
        self.demand = Demand()
        self.keep_free = 0  # slots each backend keeps free for arriving users, beyond the default one

    def plan(self, now: float, arrivals_total: int, backends: int) -> None:
        """Before placing lines: update the demand and spread its headroom over ``backends``."""
        self.demand.observe(now, arrivals_total)
        headroom = self.demand.headroom()
        self.keep_free = math.ceil(headroom / backends) if backends and headroom else 0

    def admits(self, backend: Backend) -> bool:
        """May one more line go to ``backend`` (already known to have a free slot)?"""
        held = self.held[backend.name]
        free = free_slots(backend)
        if self.max_in_flight is not None:
            return held < self.max_in_flight and (free is None or free > self.keep_free)
        if free is None:
            return held < 1
        return free > max(1, self.keep_free)

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
