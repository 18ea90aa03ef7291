"""A backend (one inference server) as the balancer knows it, and the states it can be in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum


class BackendState(StrEnum):
    STARTING = "starting"  # not ready yet (llama.cpp "Loading model", a supervised process booting)
    HEALTHY = "healthy"
    BUSY = "busy"  # healthy, every slot taken: takes requests only through the queue
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"  # finishes what it has, takes nothing new
    FAILED = "failed"  # a supervised instance that gave up restarting


class CircuitState(StrEnum):
    """The passive-health circuit breaker's view (llmbalancer/circuit.py), beside the poller's state."""

    CLOSED = "closed"
    OPEN = "open"  # too many failed requests: none sent until the cooldown ends
    HALF_OPEN = "half_open"  # one probe request in flight decides


# States in which a backend may be handed a new request.
ROUTABLE = frozenset({BackendState.HEALTHY, BackendState.BUSY})


@dataclass(eq=False, slots=True)
class Backend:
    """Mutable runtime record; the registry owns every instance and all changes of state."""

    name: str
    url: str
    kind: str = "auto"
    # For kind "auto": what the health poller found it to be ("openai": no llama.cpp /health), else None.
    detected_kind: str | None = None
    max_concurrency: int | None = None
    models: tuple[str, ...] = ()
    state: BackendState = BackendState.STARTING
    state_reason: str = ""
    state_since: float = field(default_factory=time.time)
    # A supervised process is alive and has not yet been ready: refused connections mean "starting".
    launching: bool = False
    # Requests this balancer has sent and not yet finished (kept by Claim, never directly).
    in_flight: int = 0
    # From the health poller, when the backend reports them (llama.cpp /slots).
    slots_total: int | None = None
    slots_busy: int | None = None
    # Busy slots at the last poll that were not this balancer's requests (other clients).
    slots_external: int = 0
    # Requests waiting inside the backend for a slot (llama.cpp requests_deferred), when reported.
    deferred: int | None = None
    # A backend that is itself a balancer: its /llmhealth says its GPUs are busy (None: not reported).
    gpu_busy: bool | None = None
    # Models the backend says it serves (/v1/models, Ollama /api/tags), from the poller.
    served_models: tuple[str, ...] = ()
    # Token counts from responses (usage or llama.cpp timings).
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_tokens_total: int = 0
    # Passive health, kept by the circuit breaker.
    circuit_state: CircuitState = CircuitState.CLOSED
    circuit_opens: int = 0
    health_score: float = 1.0
    # Counters and last outcome, for /health, the snapshot and metrics.
    requests_total: int = 0
    errors_total: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    ttfb_avg: float | None = None  # exponentially weighted, seconds
    latency_avg: float | None = None

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE
