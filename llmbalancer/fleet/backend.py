"""A backend (one inference server) as the balancer knows it: identity and configuration, plus one view
per owner, each written by exactly one module:

- ``state`` (with its reason and time): the registry (``Registry.set_state``), on what the poller, the
  supervisor, the proxy's outcomes and operators tell it;
- ``health``: what the backend says of itself (slots, models, kind), written by the health poller;
- ``traffic``: what this balancer sent it and how that went, written by the claim guard
  (``scheduling/claims.py``);
- ``breaker``: the circuit breaker's per-backend state, written by ``fleet/circuit.py``;
- ``instance``: the supervised process behind it, when the balancer launched it (``supervisor/``);
- ``in_flight_elsewhere``: what other replicas have in flight on it, the slot ledger's (``state/``).

What a backend *is* (``name``, ``url``, ``kind``, ``max_concurrency``, ``models``: a ``BackendSpec``) is
set by whoever registered it, through the registry's ``add`` and ``update`` only; ``source`` says who that
was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class BackendState(StrEnum):
    STARTING = "starting"  # not ready yet (llama.cpp "Loading model", a supervised process booting)
    HEALTHY = "healthy"
    BUSY = "busy"  # healthy, every slot taken: takes requests only through the queue
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"  # finishes what it has, takes nothing new
    FAILED = "failed"  # a supervised instance that gave up restarting


class CircuitState(StrEnum):
    """The passive-health circuit breaker's view (llmbalancer/fleet/circuit.py), beside the poller's state."""

    CLOSED = "closed"
    OPEN = "open"  # too many failed requests: none sent until the cooldown ends
    HALF_OPEN = "half_open"  # one probe request in flight decides


# Where a backend came from: the configuration (backends, backends file, server list), the admin API,
# an agent's heartbeats, DNS discovery, or a supervised instance.
SOURCES = ("config", "api", "agent", "dns", "instance")

# States in which a backend may be handed a new request.
ROUTABLE = frozenset({BackendState.HEALTHY, BackendState.BUSY})


@dataclass(slots=True)
class Health:
    """What the backend reports of itself, as of the last probe (written by the health poller only)."""

    # For kind "auto": what the poller found it to be ("openai": no llama.cpp /health), else None.
    detected_kind: str | None = None
    # Slots, when the backend reports them (llama.cpp /slots, llamafile's /health).
    slots_total: int | None = None
    slots_busy: int | None = None
    # Busy slots at the last poll that were not this balancer's requests (other clients).
    slots_external: int = 0
    # Requests waiting inside the backend for a slot (llama.cpp requests_deferred), when reported.
    deferred: int | None = None
    # A backend that is itself a balancer: its /llmhealth says its GPUs are busy (None: not reported).
    gpu_busy: bool | None = None
    # Models the backend says it serves (/v1/models, Ollama /api/tags). Replaced, never edited in place:
    # model routing caches by the identity of this tuple.
    served_models: tuple[str, ...] = ()


@dataclass(slots=True)
class Traffic:
    """What this balancer sent the backend and how it went (written by the claim guard only)."""

    in_flight: int = 0  # requests claimed and not yet released
    requests_total: int = 0
    errors_total: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    ttfb_avg: float | None = None  # exponentially weighted, seconds
    latency_avg: float | None = None
    # Token counts from responses (usage or llama.cpp timings).
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_tokens_total: int = 0


@dataclass(slots=True)
class Breaker:
    """The circuit breaker's state for one backend (written by ``fleet/circuit.py`` only)."""

    state: CircuitState = CircuitState.CLOSED
    opens: int = 0  # times it opened, ever
    trips: int = 0  # consecutive openings without a close: the cooldown doubles with each
    open_until: float = 0.0  # monotonic
    probe_since: float | None = None  # when the half-open probe request was claimed
    # 0..1: rises on success, falls on error; shown in the snapshot and metrics (no policy reads it).
    health_score: float = 1.0


class SupervisedProcess(Protocol):
    """The supervisor's instance behind a backend it launched, as the fleet needs to see it."""

    @property
    def booting(self) -> bool:
        """The process is alive and has not been ready since it started: a refused connection means
        "not listening yet", not "down"."""
        ...


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What a source says a backend is: all that a registration sets and an update may change."""

    name: str
    url: str
    kind: str = "auto"
    max_concurrency: int | None = None
    models: tuple[str, ...] = ()  # declared (configuration, the admin API, an agent's report)
    api_key: str | None = field(default=None, repr=False)  # sent as its Authorization (never shown or logged)
    rpm: int | None = None  # requests per minute it may be sent (scheduling/backend_limits.py)
    tpm: int | None = None  # tokens per minute


SPEC_FIELDS = ("url", "kind", "max_concurrency", "models", "api_key", "rpm", "tpm")


@dataclass(eq=False, slots=True)
class Backend:
    name: str
    url: str
    kind: str = "auto"
    max_concurrency: int | None = None
    models: tuple[str, ...] = ()  # declared in configuration
    api_key: str | None = field(default=None, repr=False)
    rpm: int | None = None
    tpm: int | None = None
    source: str = "config"  # one of SOURCES
    state: BackendState = BackendState.STARTING
    state_reason: str = ""
    state_since: float = field(default_factory=time.time)
    health: Health = field(default_factory=Health)
    traffic: Traffic = field(default_factory=Traffic)
    breaker: Breaker = field(default_factory=Breaker)
    instance: SupervisedProcess | None = None
    # Requests other replicas of this balancer (sharing ``state.url``) have in flight here, as last heard:
    # written by the replicas' slot ledger (``state/ledger.py``) only; 0 for a balancer on its own.
    in_flight_elsewhere: int = 0

    @classmethod
    def of(cls, spec: BackendSpec, source: str) -> Backend:
        return cls(
            spec.name, spec.url, spec.kind, spec.max_concurrency, spec.models, spec.api_key, spec.rpm, spec.tpm,
            source=source,
        )

    @property
    def spec(self) -> BackendSpec:
        return BackendSpec(
            self.name, self.url, self.kind, self.max_concurrency, self.models, self.api_key, self.rpm, self.tpm
        )

    @property
    def auth_headers(self) -> dict[str, str]:
        """The headers that carry its own credentials (``api_key``): on probes and on every request sent to it."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE

    @property
    def booting(self) -> bool:
        return self.instance is not None and self.instance.booting
