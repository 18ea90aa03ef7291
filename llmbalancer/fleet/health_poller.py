"""Service: asks each backend whether it is ready and keeps the registry's view of it current.

Each backend has its own loop, so a slow backend never delays news about the others; a backend
that is not routable is probed more often so that it rejoins within a fraction of a second of
being ready again. What one probe sees is in ``probes``; the state is judged here over a sliding
window (``health.window``): a refused connection ejects at once, other failures after two in a row
(so a dead backend is out within three intervals), and a backend that went down more than once
within the window (flapping) stays out until the window holds at most one drop. A healthy backend is
shown busy when every poll over the whole window found every slot busy (one free slot ends it), so a
server that is merely full now and then does not flip state, and log a change, at every poll. (Routing
does not wait for this: the capacity gate counts free slots at once.) Slot figures are written into the
backend record in place and wake the admission queue when they change (``write_health``, which an
agent's heartbeat goes through too).

A backend registered by an agent is not polled: its agent probes it where it runs, with the same
probes, and its heartbeats write its ``health`` view (``fleet/agents.py``); one writer per backend.
A backend added at run time is probed at once; one removed stops being probed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque

import aiohttp
import structlog

from llmbalancer.config import HealthConfig, TimeoutsConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.capacity import free_slots
from llmbalancer.fleet.probes import Observation, ProbeMemory, probe
from llmbalancer.fleet.registry import Registry

log = structlog.get_logger("llmbalancer.fleet.health_poller")

_FAST_RECHECK = 0.25
_FAILURES_TO_EJECT = 2
_FLAPPING_DROPS = 2

__all__ = ["HealthPoller", "Observation", "probe"]


class _Window:
    """A backend's recent probe outcomes (True ok, None starting, False failed) within ``span`` seconds."""

    __slots__ = ("_full_since", "_outcomes", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._outcomes: deque[tuple[float, bool | None]] = deque(maxlen=256)
        self._full_since: float | None = None

    def saturated(self, full: bool) -> bool:
        """Whether every poll for the whole window found every slot busy (``full`` is this poll's finding)."""
        if not full:
            self._full_since = None
            return False
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        return now - self._full_since >= self.span

    def add(self, outcome: bool | None) -> None:
        now = time.monotonic()
        self._outcomes.append((now, outcome))
        while self._outcomes and self._outcomes[0][0] < now - self.span:
            self._outcomes.popleft()

    def failed_in_a_row(self) -> int:
        count = 0
        for _, outcome in reversed(self._outcomes):
            if outcome is not False:
                break
            count += 1
        return count

    def flapping(self) -> bool:
        """Went down more than once within the window (a steady outage followed by recovery is not)."""
        outcomes = [o for _, o in self._outcomes if o is not None]
        drops = sum(1 for before, after in itertools.pairwise(outcomes) if before and not after)
        return drops >= _FLAPPING_DROPS


def write_health(registry: Registry, backend: Backend, seen: Observation) -> None:
    """Write what a successful probe saw into ``backend.health`` in place (the poller's, or for an agent's
    backend its heartbeat's); wake queued requests when capacity may have changed (the registry wakes
    them when the model list does)."""
    health = backend.health
    before = (health.slots_total, health.slots_external, health.gpu_busy)
    health.gpu_busy = seen.gpu_busy
    if seen.slots_total is not None:
        health.slots_total = seen.slots_total
        health.slots_busy = seen.slots_busy
        # Busy slots beyond our own requests (and our other replicas') belong to other clients. Ours may not
        # show yet (dispatched after the server's last decode step), so never count below zero.
        ours = backend.traffic.in_flight + backend.in_flight_elsewhere
        health.slots_external = max(0, (seen.slots_busy or 0) - ours)
    health.deferred = seen.deferred
    if seen.models is not None and seen.models != health.served_models:
        health.served_models = seen.models
        registry.models_changed()
    if seen.kind is not None:
        health.detected_kind = seen.kind
    if (health.slots_total, health.slots_external, health.gpu_busy) != before:
        registry.notify_change()


def polled(backend: Backend) -> bool:
    """Whether the poller probes ``backend`` (an agent's backend is reported by its agent instead)."""
    return backend.source != "agent"


def judge(window: _Window, seen: Observation) -> tuple[BackendState | None, str]:
    """The state the window supports after ``seen``, or None to keep the current one."""
    if seen.ok is None:
        return BackendState.STARTING, seen.reason
    if seen.ok is False:
        if seen.refused or window.failed_in_a_row() >= _FAILURES_TO_EJECT:
            return BackendState.UNHEALTHY, seen.reason
        return None, ""
    if window.flapping():
        return BackendState.UNHEALTHY, "went down more than once within the window (flapping)"
    return BackendState.HEALTHY, ""


class HealthPoller:
    name = "health-poller"

    def __init__(self, registry: Registry, health: HealthConfig, timeouts: TimeoutsConfig) -> None:
        self._registry = registry
        self._interval = health.interval
        self._timeout = aiohttp.ClientTimeout(total=timeouts.health)
        self._window = health.window
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._watched: dict[str, Backend] = {}  # the backend each loop probes (a name may come back anew)
        self._windows: dict[str, _Window] = {}
        self._memories: dict[str, tuple[str, ProbeMemory]] = {}  # by name: (the URL it is about, memory)
        self._crashes: dict[str, str] = {}  # the last unexpected error per backend, logged once
        self._session: aiohttp.ClientSession | None = None
        self._restart = asyncio.Event()
        registry.on_added.append(self._added)
        registry.on_removed.append(self._removed)

    def configure(self, health: HealthConfig, timeouts: TimeoutsConfig) -> None:
        """New settings (a reload): intervals and windows at the next probe; a new probe timeout restarts
        the probes with a session that has it."""
        self._interval = health.interval
        self._window = health.window
        for window in self._windows.values():
            window.span = health.window
        timeout = aiohttp.ClientTimeout(total=timeouts.health)
        if timeout != self._timeout:
            self._timeout = timeout
            self._restart.set()

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        """One probe of every backend (the start-up round): whatever they answer, it returns."""
        await asyncio.gather(
            *(self._guarded_check(session, backend) for backend in self._registry.backends if polled(backend))
        )

    async def _guarded_check(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        """A check that cannot fail: a bug of ours meeting an answer nobody foresaw is logged (once per
        backend and kind of error) and counts as a failed probe; the watch goes on."""
        try:
            await self._check(session, backend)
        except Exception as exc:
            kind = f"{type(exc).__name__}: {str(exc)[:200]}"
            if self._crashes.get(backend.name) != kind:
                self._crashes[backend.name] = kind
                log.exception("health_check_crashed", backend=backend.name)
            if backend.routable:
                self._registry.set_state(backend, BackendState.UNHEALTHY, f"health check failed ({kind})")

    async def _check(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        known = self._memories.get(backend.name)
        if known is None or known[0] != backend.url:  # what the server at another URL taught does not hold
            known = self._memories[backend.name] = (backend.url, ProbeMemory())
        seen = await probe(session, backend, known[1])
        window = self._windows.setdefault(backend.name, _Window(self._window))
        window.add(seen.ok)
        if seen.ok:
            write_health(self._registry, backend, seen)
        saturated = window.saturated(seen.ok is True and free_slots(backend) == 0)
        if backend.state in (BackendState.DRAINING, BackendState.FAILED):
            return  # set by an operator or the supervisor; a probe does not undo it
        state, reason = judge(window, seen)
        if backend.booting and state is BackendState.UNHEALTHY:
            return  # a supervised process still booting refuses connections until it binds its port
        if state is BackendState.HEALTHY and saturated:
            state, reason = BackendState.BUSY, f"every slot busy for {self._window:g} s"
        if state is None:
            return
        if state is BackendState.HEALTHY and not backend.routable:
            # Back after an outage: the failures that opened its circuit were that outage; take it back now.
            self._registry.circuit.reset(backend)
        self._registry.set_state(backend, state, reason)

    async def run(self) -> None:
        while True:
            self._restart = asyncio.Event()
            # A fresh connection per probe: a probe must find out whether the backend accepts connections
            # now, not reuse one to a process that has since died (and then wait for its timeout).
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(timeout=self._timeout, connector=connector) as session:
                self._session = session
                try:
                    while not self._restart.is_set():
                        # Backends added or removed are noticed at once (on_added, on_removed); this sweep
                        # restarts a loop that ended and is the backstop for anything missed.
                        self._sync_loops(session)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self._interval):
                                await self._restart.wait()
                finally:
                    self._session = None
                    tasks = list(self._loops.values())
                    self._loops.clear()
                    self._watched.clear()
                    for task in tasks:
                        task.cancel()
                    for task in tasks:
                        with contextlib.suppress(asyncio.CancelledError):
                            await task

    def _added(self, backend: Backend) -> None:
        if self._session is not None and polled(backend):
            self._start(self._session, backend)

    def _removed(self, backend: Backend) -> None:
        if self._watched.get(backend.name) is backend:
            self._stop(backend.name)

    def _start(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        task = self._loops.pop(backend.name, None)
        if task is not None:
            task.cancel()
        if self._watched.get(backend.name) not in (None, backend):
            self._stop(backend.name)  # another backend under this name: nothing learnt of the old one holds
        self._watched[backend.name] = backend
        self._loops[backend.name] = asyncio.create_task(self._watch(session, backend), name=f"health:{backend.name}")

    def _stop(self, name: str) -> None:
        task = self._loops.pop(name, None)
        if task is not None:
            task.cancel()  # never awaited here: it may be the task calling (a probe's news removed it)
        self._watched.pop(name, None)
        self._windows.pop(name, None)
        self._memories.pop(name, None)
        self._crashes.pop(name, None)

    def _sync_loops(self, session: aiohttp.ClientSession) -> None:
        """One loop per polled backend, started and stopped as membership changes."""
        for name in list(self._loops):
            if self._registry.get(name) is not self._watched.get(name):
                self._stop(name)
        for backend in self._registry:
            if not polled(backend):
                continue
            task = self._loops.get(backend.name)
            if task is None or task.done():  # done: it cannot end on its own, but never leave a backend unwatched
                self._start(session, backend)

    async def _watch(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        if backend.name in self._windows:
            await self._pause(backend)  # the start-up round (poll_once) just saw it
        while True:
            await self._guarded_check(session, backend)
            await self._pause(backend)

    async def _pause(self, backend: Backend) -> None:
        """Wait for the next probe, cut short when the proxy takes the backend out of rotation meanwhile:
        its recovery is then noticed at the fast cadence, whatever ``health.interval`` is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delay(backend)
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(remaining, _FAST_RECHECK))
            if not backend.routable:
                return

    def _delay(self, backend: Backend) -> float:
        return self._interval if backend.routable else min(self._interval, _FAST_RECHECK)
