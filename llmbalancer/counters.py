"""Counters shared by every replica of a balancer: requests and tokens per key per minute, and the like.

``Counters`` is what a user of them sees (the API keys' limits): ``incr`` adds to a named count in the
current fixed window of ``window_s`` seconds (windows start at multiples of ``window_s`` since the epoch,
so every replica agrees on them) and returns the window's total so far; ``get`` reads it. Without
``state.url`` the counts live here, in memory (``LocalCounters``); with it, in Redis (``state/counters.py``),
updated atomically, and in memory again while Redis cannot be reached.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class Counters(Protocol):
    async def incr(self, key: str, amount: int = 1, window_s: float = 60.0) -> int:
        """Add ``amount`` to ``key`` in the current ``window_s`` window; the window's total after it."""
        ...

    async def get(self, key: str, window_s: float = 60.0) -> int:
        """``key``'s total in the current ``window_s`` window (0 when nothing was counted)."""
        ...


def window_of(window_s: float, now: float) -> int:
    """The number of the fixed window ``now`` (Unix seconds) falls in."""
    return int(now // window_s)


class LocalCounters:
    """In memory: this process's counts, LRU-bounded to ``max_keys`` (key, window) pairs."""

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._counts: OrderedDict[tuple[str, float, int], int] = OrderedDict()
        self._max = max_keys
        self._clock = clock

    def add(self, key: str, amount: int, window_s: float, window: int | None = None) -> int:
        """``incr`` without the await (and, for ``window``, into a given window)."""
        at = (key, window_s, window_of(window_s, self._clock()) if window is None else window)
        total = self._counts.get(at, 0) + amount
        self._counts[at] = total
        self._counts.move_to_end(at)
        while len(self._counts) > self._max:
            self._counts.popitem(last=False)
        return total

    def read(self, key: str, window_s: float) -> int:
        return self._counts.get((key, window_s, window_of(window_s, self._clock())), 0)

    def drain(self) -> list[tuple[str, float, int, int]]:
        """Every count as (key, window_s, window, total), emptied (what a store that came back is given)."""
        counts = [(key, window_s, window, total) for (key, window_s, window), total in self._counts.items()]
        self._counts.clear()
        return counts

    async def incr(self, key: str, amount: int = 1, window_s: float = 60.0) -> int:
        return self.add(key, amount, window_s)

    async def get(self, key: str, window_s: float = 60.0) -> int:
        return self.read(key, window_s)
