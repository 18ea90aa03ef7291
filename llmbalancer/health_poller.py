"""Service: asks each backend whether it is ready and keeps the registry's view of it current.

Each backend has its own loop, so a slow backend never delays news about the others; a backend
that is not routable is probed more often so that it rejoins within a fraction of a second of
being ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp

from llmbalancer.backend import Backend, BackendState
from llmbalancer.config import HealthConfig, TimeoutsConfig
from llmbalancer.registry import Registry

_FAST_RECHECK = 0.25


@dataclass(frozen=True, slots=True)
class Observation:
    state: BackendState
    reason: str = ""


async def probe(session: aiohttp.ClientSession, backend: Backend) -> Observation:
    """llama.cpp's ``/health``: 200 ready, 503 (Loading model) starting, anything else unhealthy."""
    try:
        async with session.get(backend.url + "/health") as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Observation(BackendState.UNHEALTHY, str(exc) or type(exc).__name__)
    if response.status == 200:
        return Observation(BackendState.HEALTHY)
    if response.status == 503 and b"loading" in body.lower():
        return Observation(BackendState.STARTING, "loading model")
    if response.status == 404:
        # Not a llama.cpp server: any answer at all means it is up.
        return Observation(BackendState.HEALTHY, "no /health endpoint")
    return Observation(BackendState.UNHEALTHY, f"/health answered HTTP {response.status}")


class HealthPoller:
    name = "health-poller"

    def __init__(self, registry: Registry, health: HealthConfig, timeouts: TimeoutsConfig) -> None:
        self._registry = registry
        self._interval = health.interval
        self._timeout = aiohttp.ClientTimeout(total=timeouts.health)
        self._loops: dict[str, asyncio.Task[None]] = {}

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._check(session, backend) for backend in self._registry.backends))

    async def _check(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        observation = await probe(session, backend)
        if backend.state in (BackendState.DRAINING, BackendState.FAILED):
            return  # set by an operator or the supervisor; a probe does not undo it
        if observation.state is BackendState.HEALTHY and backend.state is BackendState.BUSY:
            return  # BUSY is healthy; the scheduling layer decides when it frees
        if backend.launching and observation.state is BackendState.UNHEALTHY:
            return  # a supervised process still booting refuses connections until it binds its port
        self._registry.set_state(backend, observation.state, observation.reason)

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            try:
                while True:
                    # Membership changes are rare (supervisor, admin); notice them within an interval.
                    self._sync_loops(session)
                    await asyncio.sleep(self._interval)
            finally:
                for task in self._loops.values():
                    task.cancel()
                for task in self._loops.values():
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def _sync_loops(self, session: aiohttp.ClientSession) -> None:
        """One loop per registered backend, started and stopped as membership changes."""
        names = {backend.name for backend in self._registry}
        for name in list(self._loops):
            if name not in names:
                self._loops.pop(name).cancel()
        for backend in self._registry:
            if backend.name not in self._loops:
                self._loops[backend.name] = asyncio.create_task(
                    self._watch(session, backend), name=f"health:{backend.name}"
                )

    async def _watch(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        while True:
            await self._check(session, backend)
            delay = self._interval if backend.routable else min(self._interval, _FAST_RECHECK)
            await asyncio.sleep(delay)
