"""The selector interface every routing policy implements.

A selector is pure and synchronous: it gets the eligible backends and what it needs to know of the
request, and returns one backend or none. It does no I/O, checks no health, starts no task and
records no metric; claiming capacity is the dispatcher's separate step. The candidates it sees are
already routable and have a free slot (the dispatcher gates capacity for every policy). Policies that
learn (``sticky``, ``prefix``) do so in the ``claimed`` / ``completed`` hooks, never in ``select``.

A cache-aware policy may also ask, through ``hold_for``, to wait briefly for a *full* backend that holds
the request's prompt cache instead of being shown only the free ones: the dispatcher then waits for that
backend alone (bounded by ``Hold.wait``) before falling back to ``select`` over any free backend.

Replicas sharing state keep one memory: a policy that learns tells what it learned, as compact ``Memory``
records, to the sink given by ``share`` (which only queues them: still no I/O here), and applies the
records other replicas' policies told with ``learn``. So ``select`` reads local tables only, which mirror
the deployment's.

While requests wait in the admission queue, the dispatcher binds from the slot's side: when slots free, it
shows the policy a window of waiting requests with the free backends each may take (``bind``), and the
policy picks the pair; the default is the first in line, on the backend ``select`` picks for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.usage import Usage


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
    # The client key's name (auth/), when keys are configured: whose share of the queue it is (fairness.py).
    tenant: str | None = None
    priority_cap: int | None = None  # the key's priority: X-Priority may lower it, never raise it


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request waiting in the admission queue, as a policy sees it when slots free."""

    facts: RequestFacts
    free: Sequence[Backend]  # backends with a free slot it may take now (never empty)
    allowed: Sequence[Backend]  # every routable backend it may take, free or full (``free`` among them)
    waited_s: float = 0.0  # seconds since it joined the queue


class Hold(NamedTuple):
    """Wait up to ``wait`` seconds for a slot on ``backend`` (full now) rather than go elsewhere."""

    backend: Backend
    wait: float


class Memory(NamedTuple):
    """One thing a policy learned from one request, as another replica's policy of the same kind applies it."""

    kind: str  # the policy's own word: "pin" (sticky), "placed" and "done" (prefix)
    backend: str
    key: bytes = b""  # a session's digest, a prompt's block chain
    values: tuple[float, ...] = ()  # kind-specific numbers


MemorySink = Callable[[Memory], None]


class Selector(ABC):
    name: ClassVar[str]
    sink: MemorySink | None = None  # replicas: where what the policy learns is told (``share``)

    @abstractmethod
    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        """Pick one of ``candidates`` (never empty) for this request, or None to decline all."""

    def hold_for(self, full: Sequence[Backend], free: Sequence[Backend], facts: RequestFacts) -> Hold | None:
        """Asked once per request, before it is placed: name one of ``full`` (routable, no free slot) worth
        waiting for over every one of ``free`` (what ``select`` would be shown; may be empty), or None."""
        return None  # most policies never wait for a particular backend

    def bind(self, waiting: Sequence[Waiting]) -> tuple[int, Backend] | None:
        """Slots freed while requests wait: pick one of ``waiting`` (never empty; a window from the queue's head,
        in queue order) and one of its ``free`` backends, as (index, backend); None binds none now (a slot
        left idle while a request waits for it: only for a good reason). The default serves the first in
        line, on the backend ``select`` picks for it."""
        first = waiting[0]
        backend = self.select(first.free, first.facts)
        return None if backend is None else (0, backend)

    def claimed(self, backend: Backend, facts: RequestFacts) -> None:
        """The dispatcher claimed ``backend`` for this request (policies that learn record it here)."""
        return None  # most policies learn nothing

    def completed(self, backend: Backend, facts: RequestFacts, usage: Usage | None) -> None:
        """The request finished well on ``backend``; ``usage`` is what the backend reported, if anything."""
        return None

    def forget(self, backend_name: str) -> None:
        """``backend_name`` left the fleet: drop what the policy remembers of it (indexes, pins)."""
        return None

    def share(self, sink: MemorySink | None) -> None:
        """From now on tell ``sink`` what the policy learns (None: stop). Wrappers pass it to what they wrap."""
        self.sink = sink

    def learn(self, memory: Memory) -> None:
        """Apply what another replica's policy learned (a record its ``sink`` was told); unknown kinds are
        ignored (a replica running another policy)."""
        return None

    def entries_count(self) -> int | None:
        """Sessions the policy holds pinned (sticky), or None for policies that pin nothing."""
        return None
