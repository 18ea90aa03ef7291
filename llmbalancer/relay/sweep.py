"""One periodic sweep for many clocks: each member's ``swept(now)`` runs every ``interval`` seconds while
it is a member, instead of a timer handle armed and cancelled per chunk or per request.

A member keeps its own deadline (a float, or a flag set per chunk and read here) and acts on it when
swept; joining and leaving are a set insert and delete. A deadline is met between 0 and ``interval``
seconds late; the lean relay sizes ``interval`` at 1 % of the timeout it keeps (at most 1 s).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Swept(Protocol):
    def swept(self, now: float) -> None: ...


class Sweep:
    __slots__ = ("_handle", "_interval", "_loop", "_members")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._members: set[Swept] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: Swept) -> None:
        self._members.add(member)
        if self._handle is None:
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            self._handle = loop.call_later(self._interval, self._tick)

    def discard(self, member: Swept) -> None:
        self._members.discard(member)

    def close(self) -> None:
        self._members.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for member in list(self._members):  # a member may leave (or another join) while swept
            member.swept(now)
        if self._members:
            self._handle = loop.call_later(self._interval, self._tick)
