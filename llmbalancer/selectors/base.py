"""The selector interface every routing policy implements.

A selector is pure and synchronous: it gets the eligible backends and what it needs to know of the
request, and returns one backend or none. It does no I/O, checks no health, starts no task and
records no metric; claiming capacity is the dispatcher's separate step. The candidates it sees are
already routable and have a free slot (the dispatcher gates capacity for every policy). Policies that
learn (``sticky``, ``prefix``) do so in the ``claimed`` / ``completed`` hooks, never in ``select``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmbalancer.backend import Backend
from llmbalancer.usage import Usage


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a policy may know about a request."""

    method: str
    path: str
    client: str  # the client's address
    headers: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    # The parsed JSON body on model-carrying routes (read-only; policies must not edit it).
    body: Mapping[str, Any] | None = None


class Selector(ABC):
    name: ClassVar[str]

    @abstractmethod
    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        """Pick one of ``candidates`` (never empty) for this request, or None to decline all."""

    def claimed(self, backend: Backend, facts: RequestFacts) -> None:
        """The dispatcher claimed ``backend`` for this request (policies that learn record it here)."""
        return None  # most policies learn nothing

    def completed(self, backend: Backend, facts: RequestFacts, usage: Usage | None) -> None:
        """The request finished well on ``backend``; ``usage`` is what the backend reported, if anything."""
        return None

    def entries_count(self) -> int | None:
        """Sessions the policy holds pinned (sticky), or None for policies that pin nothing."""
        return None
