"""The claim protocol: take a slot on a backend, send, record how it went, give the slot back.

``claim_one`` selects and claims in one step (the dispatcher and racing both use it, so a racer gets the
same half-open probe bookkeeping as anyone); ``claim_on`` claims a backend the policy chose otherwise
(binding a queued request). Both return a ``Claim``, a guard whose outcome methods —
``succeeded``, ``failed``, ``abandoned`` — record what happened in one place (traffic counters, the
circuit breaker, the registry's state, the policy's memory, token totals) and release the slot.
Release happens exactly once whatever the path: the first outcome wins, and ``release()`` (or leaving
a ``with`` block) on a claim that has none is ``abandoned``. Only this module writes ``backend.traffic``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.fleet.usage import Usage
from llmbalancer.scheduling.selectors import RequestFacts, Selector
from llmbalancer.scheduling.service_rate import ServiceRate

_EWMA_WEIGHT = 0.2


class Claim:
    """One request's hold on one backend."""

    __slots__ = ("_facts", "_rate", "_registry", "_selector", "backend", "released", "since")

    def __init__(
        self, registry: Registry, selector: Selector, backend: Backend, facts: RequestFacts,
        rate: ServiceRate | None = None,
    ) -> None:
        self._registry = registry
        self._selector = selector
        self._facts = facts
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

    def _release(self) -> bool:
        if self.released:
            return False
        self.released = True
        self.backend.traffic.in_flight -= 1
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
    rate: ServiceRate | None = None,
) -> Claim | None:
    """Let the policy pick one of ``eligible`` (routable, room, circuit allowing) and claim it, or None;
    ``rate`` learns how long the claim held its slot."""
    backend = selector.select(eligible, facts) if eligible else None
    if backend is None:
        return None
    return claim_on(registry, selector, backend, facts, rate)


def claim_on(
    registry: Registry, selector: Selector, backend: Backend, facts: RequestFacts, rate: ServiceRate | None = None
) -> Claim:
    """Claim a slot on ``backend``, already chosen (by ``select``, or by ``bind`` for a queued request)."""
    claim = Claim(registry, selector, backend, facts, rate)
    registry.circuit.claimed(backend)
    selector.claimed(backend, facts)
    return claim


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + _EWMA_WEIGHT * (sample - previous)
