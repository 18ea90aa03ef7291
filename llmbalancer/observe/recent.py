"""The last N finished requests, for the snapshot and the monitor; fed by ``Proxy.on_complete``."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass

from llmbalancer.relay.access import MAX_TEXT, Access, clip


@dataclass(frozen=True, slots=True)
class RecentRequest:
    time: float  # wall clock when the request arrived, seconds since the epoch
    request_id: str
    method: str
    path: str
    model: str | None
    backend: str | None
    status: int
    attempts: int
    ttft_s: float | None
    duration_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None
    key: str | None = None  # the client key's name

    def describe(self) -> dict[str, object]:
        return {
            "time": self.time,
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "backend": self.backend,
            "status": self.status,
            "attempts": self.attempts,
            "ttft_s": self.ttft_s,
            "duration_s": self.duration_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "error": self.error,
            "key": self.key,
        }


def from_access(access: Access, wall_offset: float | None = None) -> RecentRequest:
    """Access times are monotonic; the arrival is turned into wall-clock time here (``wall_offset``:
    wall-clock minus monotonic time, taken once for a whole snapshot)."""
    finished = access.finished or time.monotonic()
    if wall_offset is None:
        wall_offset = time.time() - time.monotonic()
    return RecentRequest(
        time=access.started + wall_offset,
        request_id=access.request_id,
        method=access.method,
        path=access.path,
        model=access.model,
        backend=access.backend,
        status=access.status,
        attempts=access.attempts,
        ttft_s=None if access.ttfb is None else access.ttfb - access.started,
        duration_s=finished - access.started,
        prompt_tokens=access.prompt_tokens,
        completion_tokens=access.completion_tokens,
        error=access.error,
        key=access.key_name,
    )


class RecentRequests:
    """A bounded ring: appending is O(1) and the oldest entry falls off. It keeps the finished requests'
    ``Access`` records themselves (done with once observed) and makes ``RecentRequest``s only when read:
    requests finish far more often than the snapshot is asked for. A record naming a long model, path or
    error (a client's 1 MiB model name) is kept as a copy with those cut to ``MAX_TEXT`` characters."""

    def __init__(self, size: int) -> None:
        self._ring: deque[Access] = deque(maxlen=size)
        self.observed = 0  # every request seen, kept or not

    def observe(self, access: Access) -> None:
        self.observed += 1
        if (
            len(access.path) > MAX_TEXT
            or (access.model is not None and len(access.model) > MAX_TEXT)
            or (access.error is not None and len(access.error) > MAX_TEXT)
        ):
            # A copy: the record is the other observers' too.
            access = dataclasses.replace(
                access, path=clip(access.path), model=clip(access.model), error=clip(access.error), usage_tail=b""
            )
        self._ring.append(access)  # a deque of maxlen 0 keeps nothing

    def newest_first(self) -> list[RecentRequest]:
        wall_offset = time.time() - time.monotonic()
        return [from_access(access, wall_offset) for access in reversed(self._ring)]
