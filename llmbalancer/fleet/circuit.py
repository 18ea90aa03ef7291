"""Passive health: a circuit breaker per backend, fed by the outcomes of requests, and a health score.

Closed: requests flow. After ``failures`` consecutive failures (refused connections, 5xx answers
worth a retry, broken streams) it opens: the backend takes no request for a cooldown that starts at
``cooldown`` seconds and doubles on every re-opening up to ``cooldown_max``. Once the cooldown has
passed it is half-open: exactly one request (the probe) may go; its success closes the circuit (and
resets the cooldown), its failure opens it again for longer. A probe that never reports (its client
left) is replaced after another cooldown. The health poller's view is separate: the breaker catches
what a 200 on ``/health`` does not (a server that answers probes and fails requests). A backend the
poller finds ready again after an outage starts with a closed circuit (``reset``): it is taken back at
once, not after a cooldown that only repeated the outage.

The health score (0..1, shown in the snapshot and metrics) rises on success, falls on error, and
gets a small bonus when the backend has the fastest average first byte of the fleet. It is a figure for
people: no policy reads it.

Each backend's breaker state lives in ``backend.breaker``, written here only.
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
        # Called when a cooldown ends, so queued requests look again (the registry's notify_change).
        self.on_reopen: Callable[[], None] | None = None

    def allows(self, backend: Backend) -> bool:
        """May ``backend`` be offered a new request now (pure: claiming the probe is ``claimed``)?"""
        breaker = backend.breaker
        if breaker.state is CircuitState.CLOSED:
            return True
        now = self._clock()
        if breaker.state is CircuitState.OPEN:
            return now >= breaker.open_until
        return breaker.probe_since is None or now - breaker.probe_since >= self._cooldown_for(backend)

    def claimed(self, backend: Backend) -> None:
        breaker = backend.breaker
        if breaker.state is not CircuitState.CLOSED:
            breaker.state = CircuitState.HALF_OPEN
            breaker.probe_since = self._clock()

    def success(self, backend: Backend, fleet: Iterable[Backend] = ()) -> None:
        breaker = backend.breaker
        breaker.health_score += (1.0 - breaker.health_score) * _SCORE_GAIN
        ttfb = backend.traffic.ttfb_avg
        if ttfb is not None and all(
            other.traffic.ttfb_avg is None or other.traffic.ttfb_avg >= ttfb for other in fleet
        ):
            breaker.health_score = min(1.0, breaker.health_score + _FASTEST_BONUS)
        if breaker.state is not CircuitState.CLOSED:
            log.info("circuit_closed", backend=backend.name)
            self._close(backend)

    def won_race(self, backend: Backend) -> None:
        """``backend`` answered first of several sent the same request (racing.py): the fastest-response bonus."""
        backend.breaker.health_score = min(1.0, backend.breaker.health_score + _FASTEST_BONUS)

    def failure(self, backend: Backend, consecutive: int) -> None:
        """A request failed on ``backend``; ``consecutive`` failures in a row, this one included."""
        breaker = backend.breaker
        breaker.health_score *= _SCORE_LOSS
        if breaker.state is CircuitState.HALF_OPEN or consecutive >= self._failures:
            self._open(backend, consecutive)

    def reset(self, backend: Backend) -> None:
        """The backend came back (its probes say ready after an outage): close the circuit at once."""
        if backend.breaker.state is not CircuitState.CLOSED:
            log.info("circuit_closed", backend=backend.name, reason="ready again")
            self._close(backend)

    def _close(self, backend: Backend) -> None:
        breaker = backend.breaker
        breaker.state = CircuitState.CLOSED
        breaker.trips = 0
        breaker.probe_since = None

    def _cooldown_for(self, backend: Backend) -> float:
        trips = max(1, backend.breaker.trips)
        return float(min(self._cooldown_max, self._cooldown * 2 ** (trips - 1)))

    def _open(self, backend: Backend, consecutive: int) -> None:
        breaker = backend.breaker
        if breaker.state is CircuitState.OPEN:
            return
        breaker.trips += 1
        cooldown = self._cooldown_for(backend)
        breaker.open_until = self._clock() + cooldown
        breaker.probe_since = None
        breaker.state = CircuitState.OPEN
        breaker.opens += 1
        log.info("circuit_opened", backend=backend.name, cooldown_s=cooldown, failures=consecutive)
        if self.on_reopen is not None:
            with_loop = _running_loop()
            if with_loop is not None:
                with_loop.call_later(cooldown, self.on_reopen)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
