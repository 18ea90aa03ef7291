"""Deadlines for many concurrent awaits, kept by one periodic sweep instead of a timer each.

``asyncio.timeout`` arms and cancels a timer handle per use, which costs about ten times what a dict
insert and delete cost; on a proxy's per-request path that is measurable. Here arming is a dict
entry, and while any deadline is armed one callback runs every ``resolution`` seconds and cancels the
tasks whose deadline has passed; their ``with`` block turns that cancellation into ``TimeoutError``,
as ``asyncio.timeout`` does. A deadline fires between 0 and ``resolution`` seconds late.

A deadline may belong to a group (the backend a request waits on): ``expire(group)`` ends every
deadline of the group at once, as if each had passed, for when waiting on that group is known to be
in vain (its health checks failed) before any of the deadlines comes due.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any


class Deadlines:
    def __init__(self, resolution: float) -> None:
        self._resolution = resolution
        self._due: dict[asyncio.Task[Any], tuple[float, object]] = {}
        self._fired: set[asyncio.Task[Any]] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None

    def within(self, seconds: float, group: object = None) -> Deadline:
        """``with deadlines.within(s):`` raises ``TimeoutError`` when the block has not finished in ``s``
        (or when ``group``'s deadlines are expired)."""
        return Deadline(self, seconds, group)

    def expire(self, group: object) -> int:
        """End every armed deadline of ``group`` now; returns how many there were. Rare (a backend
        leaving rotation), so a scan of the armed deadlines instead of an index kept on every arm."""
        ended = [task for task, (_, owner) in self._due.items() if owner is group]
        for task in ended:
            self._fire(task)
        return len(ended)

    def _arm(self, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop, when: float, group: object) -> None:
        self._due[task] = (when, group)
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(self._resolution, self._sweep, loop)

    def _disarm(self, task: asyncio.Task[Any]) -> bool:
        """Forget ``task``'s deadline; True when it had fired (the task was cancelled for it)."""
        if self._due.pop(task, None) is not None:
            return False
        if task in self._fired:
            self._fired.discard(task)
            return True
        return False

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_handle = None
        now = loop.time()
        for task in [task for task, (when, _) in self._due.items() if when <= now]:
            self._fire(task)
        if self._due:
            self._sweep_handle = loop.call_later(self._resolution, self._sweep, loop)

    def _fire(self, task: asyncio.Task[Any]) -> None:
        del self._due[task]
        self._fired.add(task)
        task.cancel()


class Deadline:
    __slots__ = ("_cancelling", "_deadlines", "_group", "_seconds", "_task")

    def __init__(self, deadlines: Deadlines, seconds: float, group: object) -> None:
        self._deadlines = deadlines
        self._seconds = seconds
        self._group = group
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs to run inside a task")
        loop = task.get_loop()
        self._task = task
        self._cancelling = task.cancelling()
        self._deadlines._arm(task, loop, loop.time() + self._seconds, self._group)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        task = self._task
        assert task is not None
        # As asyncio.timeout: only a cancellation that is ours alone becomes a timeout; one from elsewhere
        # as well (the client left) stays a cancellation.
        if (
            self._deadlines._disarm(task)
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
