"""Passive health: a circuit breaker per backend, fed by the proxy's outcomes, and a health score.

Closed: requests flow. After ``failures`` consecutive failures (refused connections, 5xx answers
worth a retry, broken streams) it opens: the backend takes no request for a cooldown that starts at
``cooldown`` seconds and doubles on every re-opening up to ``cooldown_max``. Once the cooldown has
passed it is half-open: exactly one request (the probe) may go; its success closes the circuit (and
resets the cooldown), its failure opens it again for longer. A probe that never reports (its client
left) is replaced after another cooldown. The health poller's view is separate: the breaker catches
what a 200 on ``/health`` does not (a server that answers probes and fails requests).

The health score (0..1, shown in the snapshot and metrics) rises on success, falls on error, and
gets a small bonus when the backend has the fastest average first byte of the fleet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog

from llmbalancer.config import CircuitConfig
from llmbalancer.fleet.backend import Backend, CircuitState

log = structlog.get_logger("llmbalancer.fleet.circuit")

_SCORE_GAIN = 0.1
_SCORE_LOSS = 0.7
_FASTEST_BONUS = 0.02


class Circuit:
    def __init__(
        self, config: CircuitConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        config = config or CircuitConfig()
        self._failures = config.failures
        self._cooldown = config.cooldown
        self._cooldown_max = config.cooldown_max
        self._clock = clock
        self._open_until: dict[str, float] = {}
        self._trips: dict[str, int] = {}
        self._probe_since: dict[str, float] = {}
        # Called when a cooldown ends, so queued requests look again (the registry's notify_change).
        self.on_reopen: Callable[[], None] | None = None

    def allows(self, backend: Backend) -> bool:
        """May ``backend`` be offered a new request now (pure: claiming the probe is ``claimed``)?"""
        if backend.circuit_state is CircuitState.CLOSED:
            return True
        now = self._clock()
        if backend.circuit_state is CircuitState.OPEN:
            return now >= self._open_until.get(backend.name, 0.0)
        started = self._probe_since.get(backend.name)
        return started is None or now - started >= self._cooldown_for(backend)

    def claimed(self, backend: Backend) -> None:
        if backend.circuit_state is not CircuitState.CLOSED:
            backend.circuit_state = CircuitState.HALF_OPEN
            self._probe_since[backend.name] = self._clock()

    def success(self, backend: Backend, fleet: Iterable[Backend] = ()) -> None:
        backend.health_score += (1.0 - backend.health_score) * _SCORE_GAIN
        if backend.ttfb_avg is not None and all(
            other.ttfb_avg is None or other.ttfb_avg >= backend.ttfb_avg for other in fleet
        ):
            backend.health_score = min(1.0, backend.health_score + _FASTEST_BONUS)
        if backend.circuit_state is not CircuitState.CLOSED:
            log.info("circuit_closed", backend=backend.name)
            backend.circuit_state = CircuitState.CLOSED
            self._trips.pop(backend.name, None)
            self._probe_since.pop(backend.name, None)

    def won_race(self, backend: Backend) -> None:
        """``backend`` answered first of several sent the same request (racing.py): the fastest-response bonus."""
        backend.health_score = min(1.0, backend.health_score + _FASTEST_BONUS)

    def failure(self, backend: Backend) -> None:
        backend.health_score *= _SCORE_LOSS
        if backend.circuit_state is CircuitState.HALF_OPEN or backend.consecutive_failures >= self._failures:
            self._open(backend)

    def _cooldown_for(self, backend: Backend) -> float:
        trips = self._trips.get(backend.name, 1)
        return float(min(self._cooldown_max, self._cooldown * 2 ** (trips - 1)))

    def _open(self, backend: Backend) -> None:
        if backend.circuit_state is CircuitState.OPEN:
            return
        self._trips[backend.name] = self._trips.get(backend.name, 0) + 1
        cooldown = self._cooldown_for(backend)
        self._open_until[backend.name] = self._clock() + cooldown
        self._probe_since.pop(backend.name, None)
        backend.circuit_state = CircuitState.OPEN
        backend.circuit_opens += 1
        log.info("circuit_opened", backend=backend.name, cooldown_s=cooldown, failures=backend.consecutive_failures)
        if self.on_reopen is not None:
            with_loop = _running_loop()
            if with_loop is not None:
                with_loop.call_later(cooldown, self.on_reopen)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
