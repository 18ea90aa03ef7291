"""Backend capacity by the minute (``backends[].rpm``, ``backends[].tpm``): a backend that has been sent its
requests or tokens for this minute is not offered another request until the next minute; others take them,
or they wait in the admission queue, which is woken when the minute turns.

Counted from what the claim guard already keeps (``Traffic.requests_total``, claimed requests, and the
prompt and completion tokens the responses reported), against the totals at the minute's start: nothing
more per request. Minutes are fixed windows, as the keys' (``counters.window_of``). A backend's counts are
this balancer's own (replicas each count what they send).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from llmbalancer.counters import window_of
from llmbalancer.fleet.backend import Backend

WINDOW_S = 60.0


class BackendLimits:
    __slots__ = ("_clock", "_starts", "_timer", "_wake")

    def __init__(self, wake: Callable[[], None], clock: Callable[[], float] = time.time) -> None:
        self._wake = wake  # tells waiting requests to look again (the registry's notify_change)
        self._clock = clock
        self._starts: dict[str, tuple[int, int, int]] = {}  # backend -> (window, requests, tokens) at its start
        self._timer: asyncio.TimerHandle | None = None

    def allows(self, backend: Backend) -> bool:
        """Whether ``backend`` may be offered a request now (it has no rpm/tpm, or is within them)."""
        if backend.rpm is None and backend.tpm is None:
            return True
        now = self._clock()
        window = window_of(WINDOW_S, now)
        traffic = backend.traffic
        tokens = traffic.prompt_tokens_total + traffic.completion_tokens_total
        start = self._starts.get(backend.name)
        if start is None or start[0] != window:
            start = self._starts[backend.name] = (window, traffic.requests_total, tokens)
            if len(self._starts) > 10_000:  # names of backends long gone
                self._starts = {backend.name: start}
        if (backend.rpm is not None and traffic.requests_total - start[1] >= backend.rpm) or (
            backend.tpm is not None and tokens - start[2] >= backend.tpm
        ):
            self._wake_at_next_window(WINDOW_S - now % WINDOW_S)
            return False
        return True

    def used(self, backend: Backend) -> tuple[int, int]:
        """Requests and tokens sent to ``backend`` in this window (as far as this balancer counted)."""
        start = self._starts.get(backend.name)
        if start is None or start[0] != window_of(WINDOW_S, self._clock()):
            return 0, 0
        traffic = backend.traffic
        tokens = traffic.prompt_tokens_total + traffic.completion_tokens_total
        return traffic.requests_total - start[1], tokens - start[2]

    def _wake_at_next_window(self, delay: float) -> None:
        if self._timer is not None and not self._timer.cancelled():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop, no waiter to wake
        self._timer = loop.call_later(delay + 0.01, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._wake()
