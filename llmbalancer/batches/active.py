"""A batch the runner is working on, in memory: the lines loaded and not yet sent, lines sent again after
a failure, the lines running, its counters and its recent pace.

Lines are loaded from the store a window at a time (``LOAD``, by line number past ``cursor``), so a batch
of 50,000 lines holds a few hundred in memory; a line that failed on a backend waits in ``retries`` (sent
before new lines) with the backends it failed on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llmbalancer.batches.records import BatchRecord
from llmbalancer.batches.store import DONE, Line, LineResult
from llmbalancer.scheduling.selectors import RequestFacts

LOAD = 256  # lines read from the store at a time
_LOW = LOAD // 4  # read more when fewer than this are loaded
RATE_WINDOW_S = 60.0
_HEADERS: dict[str, str] = {}


@dataclass(eq=False, slots=True)
class Pending:
    """A line waiting for a slot: its parsed body and the backends it already failed on."""

    line: Line
    attempts: int
    body: dict[str, Any]
    facts: RequestFacts
    failed_on: frozenset[str] = frozenset()

    @classmethod
    def of(cls, line: Line, endpoint: str) -> Pending:
        body = json.loads(line.body)
        model = body.get("model")
        facts = RequestFacts(
            "POST", endpoint, "batch", _HEADERS, model if isinstance(model, str) else None, body
        )
        return cls(line, line.attempts, body, facts)

    def encoded(self, model: str | None) -> bytes:
        """The body to send; ``model``: the name the chosen backend knows the model by, if another."""
        if model is None:
            return self.line.body.encode()
        return json.dumps({**self.body, "model": model}, ensure_ascii=False).encode()


@dataclass(eq=False)
class ActiveBatch:
    id: str
    seq: int
    priority: int
    status: str
    endpoint: str
    model: str | None
    created_at: int
    expires_at: int | None
    total: int
    completed: int
    failed: int
    closing: str | None = None  # the status it ends in once its running lines are done (expired, cancelled)
    owner: str | None = None  # the client key that made it: its lines count against that key's limits
    loaded: deque[Pending] = field(default_factory=deque)
    retries: deque[Pending] = field(default_factory=deque)
    running: dict[int, asyncio.Task[None]] = field(default_factory=dict)  # by line number
    cursor: int = 0
    exhausted: bool = False
    loading: bool = False
    finishing: bool = False
    _finished: deque[float] = field(default_factory=deque)

    @classmethod
    def of(cls, record: BatchRecord) -> ActiveBatch:
        return cls(
            record.id, record.seq, record.priority, record.status, record.endpoint, record.model,
            record.times["created_at"] or 0, record.times["expires_at"], record.total, record.completed,
            record.failed, owner=record.owner,
        )

    def next_line(self) -> Pending | None:
        if self.retries:
            return self.retries[0]
        return self.loaded[0] if self.loaded else None

    def take(self, pending: Pending) -> None:
        (self.retries if self.retries and self.retries[0] is pending else self.loaded).popleft()

    def wants_lines(self) -> bool:
        return not self.exhausted and not self.loading and len(self.loaded) < _LOW and self.closing is None

    def add_loaded(self, lines: list[Line]) -> None:
        for line in lines:
            self.loaded.append(Pending.of(line, self.endpoint))
        if lines:
            self.cursor = lines[-1].line
        self.exhausted = len(lines) < LOAD

    @property
    def idle(self) -> bool:
        """Nothing running; and, unless it is closing, nothing left to send."""
        if self.running:
            return False
        return self.closing is not None or (self.exhausted and not self.loaded and not self.retries)

    def counted(self, result: LineResult) -> None:
        if result.state == DONE:
            self.completed += 1
        else:
            self.failed += 1
        now = time.monotonic()
        self._finished.append(now)
        while self._finished and self._finished[0] < now - RATE_WINDOW_S:
            self._finished.popleft()

    def rate(self) -> float | None:
        """Lines finished per second over the last minute (or since the first of them), None before two."""
        now = time.monotonic()
        while self._finished and self._finished[0] < now - RATE_WINDOW_S:
            self._finished.popleft()
        if len(self._finished) < 2:
            return None
        span = max(now - self._finished[0], 1e-3)
        return len(self._finished) / span

    def describe(self) -> dict[str, Any]:
        rate = self.rate()
        left = max(0, self.total - self.completed - self.failed)
        eta = left / rate if rate and self.closing is None and self.status != "cancelling" else None
        return {
            "id": self.id,
            "status": self.status,
            "endpoint": self.endpoint,
            "model": self.model,
            "priority": self.priority,
            "total": self.total,
            "completed": self.completed,
            "failed": self.failed,
            "in_flight": len(self.running),
            "rate_per_s": None if rate is None else round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }
