"""The claim protocol: take a slot on a backend, send, record how it went, give the slot back.

``claim_one`` selects and claims in one step (the dispatcher and racing both use it, so a racer gets the
same half-open probe bookkeeping as anyone); ``claim_on`` claims a backend the policy chose otherwise
(binding a queued request). Both return a ``Claim``, a guard whose outcome methods —
``succeeded``, ``failed``, ``abandoned`` — record what happened in one place (traffic counters, the
circuit breaker, the registry's state, the policy's memory, token totals) and release the slot.
Release happens exactly once whatever the path: the first outcome wins, and ``release()`` (or leaving
a ``with`` block) on a claim that has none is ``abandoned``. Only this module writes ``backend.traffic``.

Replicas sharing state (``state.url``) count each backend's claims together through a ``SlotLedger``: the
dispatcher asks it to ``admit`` a claim (one bounded round trip: the fleet-wide count checked against the
backend's capacity and ours written, atomically) and every release is told to it (written behind the
request, never awaited by it). The ledger also carries each replica's first in line per model, so that a
slot freed anywhere goes to the request that has waited longest anywhere (the dispatcher's ``_MAX_YIELD``).
Without one, a claim is this process's business alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.fleet.usage import Usage
from llmbalancer.scheduling.selectors import RequestFacts, Selector
from llmbalancer.scheduling.service_rate import ServiceRate

_EWMA_WEIGHT = 0.2


class SlotLedger(Protocol):
    """In-flight counts per backend shared by the replicas of one balancer (``state/ledger.py``)."""

    async def admit(self, backend: Backend) -> bool:
        """Our claim on ``backend`` (already counted in its ``traffic.in_flight``) fits in its capacity with
        every replica's claims counted: True (and written), or False (another replica took the slot first:
        give it back). True whenever the shared count cannot be reached: degraded, never failed."""
        ...

    def released(self, backend: Backend) -> None:
        """One of our claims on ``backend`` was given back (tell the other replicas; never blocks)."""
        ...

    def queue_head(self, model: str, head: tuple[int, float] | None) -> None:
        """Our first in line for ``model``: its priority and when it began waiting (Unix seconds), or None."""
        ...

    def goes_first_elsewhere(self, model: str, priority: int, since: float) -> bool:
        """Another replica's first in line for ``model`` goes before a request of ``priority`` waiting since
        ``since``: a higher priority, or as high and waiting longer."""
        ...


class Claim:
    """One request's hold on one backend."""

    __slots__ = ("_facts", "_ledger", "_rate", "_registry", "_selector", "backend", "released", "since")

    def __init__(
        self, registry: Registry, selector: Selector, backend: Backend, facts: RequestFacts,
        ledger: SlotLedger | None = None, rate: ServiceRate | None = None,
    ) -> None:
        self._registry = registry
        self._selector = selector
        self._facts = facts
        self._ledger = ledger
        self._rate = rate
        self.backend = backend
        self.released = False
        self.since = time.monotonic()
        traffic = backend.traffic
        traffic.in_flight += 1
        traffic.requests_total += 1

    def succeeded(self, usage: Usage | None, ttfb: float | None, latency: float) -> None:
        """The backend answered in full; ``ttfb``/``latency`` in seconds from the request's arrival."""
        if not self._release():
            return
        backend = self.backend
        traffic = backend.traffic
        traffic.consecutive_failures = 0
        if ttfb is not None:
            traffic.ttfb_avg = _ewma(traffic.ttfb_avg, ttfb)
        traffic.latency_avg = _ewma(traffic.latency_avg, latency)
        if usage is not None:
            traffic.prompt_tokens_total += usage.prompt_tokens or 0
            traffic.completion_tokens_total += usage.completion_tokens or 0
            traffic.cached_tokens_total += usage.cached_tokens or 0
        self._registry.circuit.success(backend, self._registry)
        self._selector.completed(backend, self._facts, usage)
        if self._rate is not None:
            self._rate.completed(self._facts.model or "", time.monotonic() - self.since)
        self._registry.notify_change()

    def failed(self, reason: str, *, unreachable: bool = False) -> None:
        """The backend failed this request; an ``unreachable`` one leaves rotation until a probe says ready."""
        if not self._release():
            return
        backend = self.backend
        traffic = backend.traffic
        traffic.errors_total += 1
        traffic.consecutive_failures += 1
        traffic.last_error = reason
        self._registry.circuit.failure(backend, traffic.consecutive_failures)
        if unreachable and backend.state not in (BackendState.DRAINING, BackendState.FAILED):
            self._registry.set_state(backend, BackendState.UNHEALTHY, reason)
        self._registry.notify_change()

    def abandoned(self) -> None:
        """Nothing to hold against or credit the backend with (the client left, a racer lost, the pool
        handed us a connection the backend had closed): just give the slot back."""
        if self._release():
            self._registry.notify_change()

    def release(self) -> None:
        self.abandoned()

    def placed(self) -> None:
        """The request goes to this backend: the circuit (a half-open probe) and the policy's memory learn it.
        ``claim_one`` calls it, or, with ``held``, the dispatcher once the shared ledger admitted the claim
        (a refused one leaves no trace)."""
        self._registry.circuit.claimed(self.backend)
        self._selector.claimed(self.backend, self._facts)

    def _release(self) -> bool:
        if self.released:
            return False
        self.released = True
        self.backend.traffic.in_flight -= 1
        if self._ledger is not None:
            self._ledger.released(self.backend)
        return True

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abandoned()


def claim_one(
    registry: Registry,
    selector: Selector,
    eligible: Sequence[Backend],
    facts: RequestFacts,
    ledger: SlotLedger | None = None,
    rate: ServiceRate | None = None,
    *,
    held: bool = False,
) -> Claim | None:
    """Let the policy pick one of ``eligible`` (routable, room, circuit allowing) and claim it, or None.
    ``rate`` learns how long the claim held its slot; ``held``: the slot is counted, and the caller calls
    ``placed`` once the claim is confirmed."""
    backend = selector.select(eligible, facts) if eligible else None
    if backend is None:
        return None
    return claim_on(registry, selector, backend, facts, ledger, rate, held=held)


def claim_on(
    registry: Registry,
    selector: Selector,
    backend: Backend,
    facts: RequestFacts,
    ledger: SlotLedger | None = None,
    rate: ServiceRate | None = None,
    *,
    held: bool = False,
) -> Claim:
    """Claim a slot on ``backend``, already chosen (by ``select``, or by ``bind`` for a queued request)."""
    claim = Claim(registry, selector, backend, facts, ledger, rate)
    if not held:
        claim.placed()
    return claim


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + _EWMA_WEIGHT * (sample - previous)
