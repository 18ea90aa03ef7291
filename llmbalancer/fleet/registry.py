"""The one source of truth about backends: membership and state; wakes waiters on any change.

What a backend is doing (claims, counters) is the claim guard's (``scheduling/claims.py``); it calls
``notify_change`` when a slot frees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import structlog

from llmbalancer.config import BackendConfig
from llmbalancer.fleet.backend import ROUTABLE, Backend, BackendState
from llmbalancer.fleet.circuit import Circuit

log = structlog.get_logger("llmbalancer.fleet.registry")


class Registry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._change: asyncio.Future[None] | None = None
        # Moves whenever membership or any backend's model lists change: caches of "who serves model M"
        # compare it instead of re-reading every backend per request.
        self.models_version = 0
        self.circuit = Circuit()
        self.circuit.on_reopen = self.notify_change
        # Called with a backend that left rotation because it failed (not one draining): what waits on it
        # for an answer can give up now (the proxy retries such requests elsewhere).
        self.on_failed: list[Callable[[Backend], object]] = []
        # Called with (backend, previous state) on every change of state, synchronously, before waiters
        # wake: an owner of a view that follows the state (the supervisor's instance) is never behind it.
        self.on_state: list[Callable[[Backend, BackendState], object]] = []
        # Called with a backend once it has left the registry: whoever keeps memories of it drops them.
        self.on_removed: list[Callable[[Backend], object]] = []
        # Called on every change, synchronously, after the waiters' future is set (the dispatcher binds queued
        # requests to freed slots on the change itself); must be cheap and must not raise.
        self.on_change: list[Callable[[], object]] = []

    @classmethod
    def from_configs(cls, configs: tuple[BackendConfig, ...]) -> Registry:
        registry = cls()
        for config in configs:
            registry.add(
                Backend(
                    name=config.name,
                    url=config.url,
                    kind=config.kind,
                    max_concurrency=config.max_concurrency,
                    models=config.models,
                )
            )
        return registry

    # --- membership ---------------------------------------------------------------------------

    def add(self, backend: Backend) -> Backend:
        if backend.name in self._backends:
            raise ValueError(f"backend {backend.name!r} is already registered")
        self._backends[backend.name] = backend
        self.models_version += 1
        log.info("backend_added", backend=backend.name, url=backend.url, state=backend.state.value)
        self.notify_change()
        return backend

    def remove(self, name: str) -> None:
        backend = self._backends.pop(name, None)
        if backend is not None:
            self.models_version += 1
            log.info("backend_removed", backend=name)
            for forget in self.on_removed:
                forget(backend)
            self.notify_change()

    def get(self, name: str) -> Backend | None:
        return self._backends.get(name)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())

    def __len__(self) -> int:
        return len(self._backends)

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def routable(self) -> list[Backend]:
        return [b for b in self._backends.values() if b.routable]

    def models_changed(self) -> None:
        """A backend's model lists changed (the poller discovered new ones, an update declared some)."""
        self.models_version += 1
        self.notify_change()  # a queued request for a model a backend now serves may take it

    # --- state --------------------------------------------------------------------------------

    def set_state(self, backend: Backend, state: BackendState, reason: str = "") -> None:
        """Change state; logged once per change, never per poll."""
        if backend.state is state:
            backend.state_reason = reason or backend.state_reason
            return
        previous = backend.state
        backend.state = state
        backend.state_reason = reason
        backend.state_since = time.time()
        log.info(
            "backend_state_changed", backend=backend.name, old=previous.value, new=state.value, reason=reason
        )
        for follower in self.on_state:
            follower(backend, previous)
        if previous in ROUTABLE and state in (BackendState.UNHEALTHY, BackendState.FAILED):
            for observer in self.on_failed:
                observer(backend)
        self.notify_change()

    # --- change notification ------------------------------------------------------------------

    def notify_change(self) -> None:
        change = self._change
        if change is not None:
            self._change = None
            if not change.done():
                change.set_result(None)
        for listener in self.on_change:
            listener()

    def next_change(self) -> asyncio.Future[None]:
        """Done at the next change of any backend (state, claim released, membership).

        The future exists from this call on, not from the caller's first await: a change that lands
        between a check and the wait (another task runs first) still wakes the waiter.
        """
        if self._change is None:
            self._change = asyncio.get_running_loop().create_future()
        # shield: one cancelled waiter must not cancel the future the others wait on.
        return asyncio.shield(self._change)

