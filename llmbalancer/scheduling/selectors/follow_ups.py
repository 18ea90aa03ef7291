"""Conversations expected back soon, and what a new request would cost them on each backend.

Why: llama.cpp reuses a conversation's history only while it is still in a slot, or in the host-RAM
prompt cache *and* the slot the next turn lands on is one it would keep less than half of. The next
turn picks the idle slot whose cached prompt shares the most with it: another chat with the same
system prompt wins that, keeps more than half, and the history in RAM is never restored. Measured on
the fake (which follows ``get_available_slot``): four interleaved chats on a 2-slot server reuse
~91 % of their follow-ups' prompts with four different system prompts, ~65 % with one shared prompt.
So a new chat placed on a server where chats with its system prompt are between turns destroys
their histories; placed where its prompt's family is absent, it costs one cold system prompt.

How: a conversation is known by its chain's last block name, with its backend, its length and its
*family* (the block name that covers its first ``family_blocks`` blocks, in practice the system prompt).
It is *running* from placement to completion, then *waiting*: the next turn's chain contains that last
block name, so when it is placed the waiting entry is removed, wherever it went, and the gap (think
time) is learned. Waiting entries older than ``horizon`` (a few learned gaps, at least ``min_horizon``)
are conversations that ended. Both kinds are at risk: a running chat of the family will sit in an idle
slot as soon as it finishes. ``at_risk(backend, family, shared)`` is the history, in blocks, of that
backend's conversations of the family beyond what they share with the new request: what it may evict.
Memory is bounded (``max_entries`` of each kind; a running entry whose request failed is dropped when
that bound is reached).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

_EWMA_WEIGHT = 0.1
_GAP_MULTIPLE = 3.0  # an entry lives this many mean gaps: most follow-ups arrive well within it


class _Waiting(NamedTuple):
    backend: str
    at: float
    family: bytes
    length: int  # blocks


class _Tally:
    """Per (backend, family): how many conversations wait, and their total length in blocks."""

    __slots__ = ("blocks", "count")

    def __init__(self) -> None:
        self.count = 0
        self.blocks = 0


def family_of(chain: Sequence[bytes], family_blocks: int) -> bytes:
    return chain[min(family_blocks, len(chain)) - 1]


class FollowUps:
    __slots__ = (
        "_clock", "_entries", "_max_entries", "_min_horizon", "_running", "_tallies", "family_blocks", "mean_gap",
    )

    def __init__(
        self,
        family_blocks: int,
        min_horizon: float = 2.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.family_blocks = family_blocks
        self._entries: OrderedDict[bytes, _Waiting] = OrderedDict()  # waiting between turns, oldest first
        self._running: OrderedDict[bytes, _Waiting] = OrderedDict()  # placed, not completed
        self._tallies: dict[tuple[str, bytes], _Tally] = {}
        self._min_horizon = min_horizon
        self._max_entries = max_entries
        self._clock = clock
        self.mean_gap: float | None = None  # seconds from a turn's end to the next turn's placement

    @property
    def horizon(self) -> float:
        if self.mean_gap is None:
            return self._min_horizon
        return max(self._min_horizon, _GAP_MULTIPLE * self.mean_gap)

    def __len__(self) -> int:
        return len(self._entries) + len(self._running)

    def at_risk(self, backend_name: str, family: bytes, shared: int) -> int:
        """Blocks of history, beyond ``shared`` leading blocks, of ``family`` conversations waiting on the backend."""
        self._expire()
        tally = self._tallies.get((backend_name, family))
        if tally is None:
            return 0
        return max(0, tally.blocks - tally.count * shared)

    def continues(self, chain: Sequence[bytes]) -> str | None:
        """The backend of the waiting conversation this chain continues, if any."""
        found = self._find(chain)
        return None if found is None else self._entries[found].backend

    def started(self, backend_name: str, chain: Sequence[bytes]) -> None:
        """A request with this chain was placed on ``backend_name`` (after ``arrived``)."""
        if not chain:
            return
        key = chain[-1]
        self._drop_running(key)
        entry = _Waiting(backend_name, self._clock(), family_of(chain, self.family_blocks), len(chain))
        self._running[key] = entry
        self._count(entry, 1)
        while len(self._running) > self._max_entries:
            self._drop_running(next(iter(self._running)))

    def finished(self, backend_name: str, chain: Sequence[bytes]) -> None:
        """A turn with this prompt chain completed on ``backend_name``: it waits for its next turn."""
        if not chain:
            return
        key = chain[-1]
        self._drop_running(key)
        self._drop(key)
        entry = _Waiting(backend_name, self._clock(), family_of(chain, self.family_blocks), len(chain))
        self._entries[key] = entry
        self._count(entry, 1)
        while len(self._entries) > self._max_entries:
            self._drop(next(iter(self._entries)))

    def arrived(self, chain: Sequence[bytes]) -> None:
        """A request with this chain was placed: if it continues a waiting conversation, that one is back."""
        found = self._find(chain)
        if found is None:
            return
        gap = self._clock() - self._entries[found].at
        self.mean_gap = gap if self.mean_gap is None else self.mean_gap + _EWMA_WEIGHT * (gap - self.mean_gap)
        self._drop(found)

    def forget(self, backend_name: str) -> None:
        for key in [key for key, entry in self._entries.items() if entry.backend == backend_name]:
            self._drop(key)
        for key in [key for key, entry in self._running.items() if entry.backend == backend_name]:
            self._drop_running(key)

    def _find(self, chain: Sequence[bytes]) -> bytes | None:
        entries = self._entries
        if not entries:
            return None
        # The previous turn's last block lies inside this prompt, past its family's blocks: search backwards.
        for name in reversed(chain[self.family_blocks :]):
            if name in entries:
                return name
        return None

    def _expire(self) -> None:
        entries = self._entries
        if not entries:
            return
        oldest = self._clock() - self.horizon
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.at >= oldest:
                return
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._count(entry, -1)

    def _drop_running(self, key: bytes) -> None:
        entry = self._running.pop(key, None)
        if entry is not None:
            self._count(entry, -1)

    def _count(self, entry: _Waiting, sign: int) -> None:
        where = (entry.backend, entry.family)
        tally = self._tallies.get(where)
        if tally is None:
            tally = self._tallies[where] = _Tally()
        tally.count += sign
        tally.blocks += sign * entry.length
        if not tally.count:
            del self._tallies[where]
