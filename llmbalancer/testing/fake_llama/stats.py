"""The counters tests read (`FakeLlama.stats`, `GET /_fake/stats`): requests seen per path, the last
request of each path as recorded, outcomes, peaks of busy slots and deferred requests, and the timeline.

These are the fake's own; the server's llama.cpp metrics (`/metrics`) live in `metrics`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request as it arrived; turned into plain data only when read."""

    method: str
    path: str
    query: str
    headers: Any  # the request's CIMultiDictProxy, turned into a dict only when read
    body: bytes

    def as_dict(self) -> dict[str, Any]:
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            k = key.lower()
            headers[k] = f"{headers[k]}, {value}" if k in headers else value
        body: Any = None
        if self.body:
            try:
                body = json.loads(self.body)
            except ValueError:
                body = self.body.decode("utf-8", "replace")
        return {"method": self.method, "path": self.path, "query": self.query, "headers": headers, "body": body}


@dataclass
class Stats:
    """The counters; the engine updates the peaks and the timeline, the middleware and generations the rest."""

    requests: dict[str, int] = field(default_factory=dict)
    requests_total: int = 0
    completed: int = 0
    cancelled: int = 0
    faults_applied: int = 0
    max_processing: int = 0
    max_deferred: int = 0
    last: RequestRecord | None = None
    last_by_path: dict[str, RequestRecord] = field(default_factory=dict)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # only with record_timeline

    def record(self, record: RequestRecord) -> None:
        """Count a request (control requests are not counted)."""
        path = record.path
        self.requests_total += 1
        self.requests[path] = self.requests.get(path, 0) + 1
        self.last = record
        self.last_by_path[path] = record

    def reset(self) -> None:
        """Zero every counter in place (the engine holds this object)."""
        self.__dict__.update(Stats().__dict__)

    def snapshot(self, *, processing: int, deferred: int, fault: dict[str, Any], running: bool) -> dict[str, Any]:
        """The counters as plain data, with the engine's state now. Header names are lower-case."""
        return {
            "requests": dict(self.requests),
            "requests_total": self.requests_total,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "faults_applied": self.faults_applied,
            "processing": processing,
            "deferred": deferred,
            "max_processing": self.max_processing,
            "max_deferred": self.max_deferred,
            "last_request": self.last.as_dict() if self.last is not None else None,
            "last_by_path": {path: rec.as_dict() for path, rec in self.last_by_path.items()},
            "fault": fault,
            "running": running,
            "timeline": list(self.timeline),
        }
