"""The one source of truth about backends: membership and state; wakes waiters on any change.

Every way a backend comes or goes (configuration, reload, the admin API, agents, DNS, the supervisor)
ends in three operations here: ``add`` (a new backend is *starting* and takes traffic only once a probe,
or its agent, says ready), ``update`` (what a source says it is changed) and ``remove``, which drains:
the backend takes no new request at once, requests waiting in the admission queue go to others, those
in flight finish (up to ``drain_timeout``), and then it is forgotten, with whatever others keep of it
(``on_removed``: the policy's indexes and pins, the poller's loop, metrics series). Each change is
logged once.

What a backend is doing (claims, counters) is the claim guard's (``scheduling/claims.py``); it calls
``notify_change`` when a slot frees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import structlog

from llmbalancer.config import BackendConfig
from llmbalancer.fleet.backend import ROUTABLE, SPEC_FIELDS, Backend, BackendSpec, BackendState, Health
from llmbalancer.fleet.circuit import Circuit

log = structlog.get_logger("llmbalancer.fleet.registry")


class Registry:
    def __init__(self, drain_timeout: float = 30.0) -> None:
        self._backends: dict[str, Backend] = {}
        # Longest a removed backend's in-flight requests are waited for before it is forgotten anyway.
        self.drain_timeout = drain_timeout
        # Backends removed and still draining, with the timer that ends their wait.
        self._leaving: dict[str, asyncio.TimerHandle | None] = {}
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
        # Called with a backend just added (the poller starts probing it at once, not at its next sweep).
        self.on_added: list[Callable[[Backend], object]] = []
        # Called with (backend, "added" | "updated" | "removing") whenever what a source says of a backend
        # changes: added, updated (or taken back while draining), removed (its drain starts). Replicas sharing
        # a fleet tell each other from here (``state/fleet_sync.py``).
        self.on_membership: list[Callable[[Backend, str], object]] = []
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
                    source="config",
                )
            )
        return registry

    # --- membership ---------------------------------------------------------------------------

    def add(self, backend: Backend) -> Backend:
        if backend.name in self._backends:
            raise ValueError(f"backend {backend.name!r} is already registered")
        self._backends[backend.name] = backend
        self.models_version += 1
        log.info(
            "backend_added", backend=backend.name, url=backend.url, source=backend.source, state=backend.state.value
        )
        for observer in self.on_added:
            observer(backend)
        self._membership(backend, "added")
        self.notify_change()
        return backend

    def update(self, name: str, spec: BackendSpec) -> list[str]:
        """Make backend ``name`` what ``spec`` says; returns the fields that changed. A new URL or kind is
        another server: nothing known of the old one holds (its ``health`` view starts empty) and it is
        *starting* until a probe says ready. A backend that was draining is taken back (*starting* too)."""
        backend = self._backends[name]
        changed = [f for f in SPEC_FIELDS if getattr(backend, f) != getattr(spec, f)]
        revived = name in self._leaving
        if revived:
            handle = self._leaving.pop(name)
            if handle is not None:
                handle.cancel()
        if not changed and not revived:
            return []
        for field in changed:
            setattr(backend, field, getattr(spec, field))
        log.info("backend_updated", backend=name, source=backend.source, changed=changed, revived=revived)
        if "url" in changed or "kind" in changed:
            backend.health = Health()
            self.set_state(backend, BackendState.STARTING, f"{' and '.join(changed[:2])} changed")
        elif revived:
            self.set_state(backend, BackendState.STARTING, "registered again")
        if "models" in changed or "url" in changed:
            self.models_version += 1
        self._membership(backend, "updated")
        self.notify_change()
        return [*changed, *(["revived"] if revived else [])]

    def remove(self, name: str, reason: str = "removed") -> Backend | None:
        """Drain, then forget ``name``: it takes no new request from now on and leaves the registry once
        its in-flight requests finished, or ``drain_timeout`` passed (whatever still runs on it then is
        not cut; it is only no longer known). Returns the backend (None: unknown)."""
        backend = self._backends.get(name)
        if backend is None:
            return None
        if name in self._leaving:
            return backend
        self.set_state(backend, BackendState.DRAINING, reason)
        self._membership(backend, "removing")
        if backend.traffic.in_flight <= 0:
            self._forget(backend, "drained")
            self.notify_change()
            return backend
        try:
            handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
                self.drain_timeout, self._drain_timed_out, backend
            )
        except RuntimeError:  # no loop (a synchronous caller): nothing can finish meanwhile
            self._forget(backend, "drained")
            return backend
        self._leaving[name] = handle
        return backend

    def _membership(self, backend: Backend, action: str) -> None:
        for observer in self.on_membership:
            observer(backend, action)

    def leaving(self, name: str) -> bool:
        """``name`` was removed and is draining."""
        return name in self._leaving

    def _drain_timed_out(self, backend: Backend) -> None:
        if backend.name not in self._leaving or self._backends.get(backend.name) is not backend:
            return
        del self._leaving[backend.name]
        log.warning("backend_drain_timeout", backend=backend.name, in_flight=backend.traffic.in_flight)
        self._forget(backend, "drain timed out")
        self.notify_change()

    def _forget_drained(self) -> None:
        for name in list(self._leaving):
            backend = self._backends.get(name)
            if backend is not None and backend.traffic.in_flight > 0:
                continue
            handle = self._leaving.pop(name, None)
            if handle is not None:
                handle.cancel()
            if backend is not None:
                self._forget(backend, "drained")

    def _forget(self, backend: Backend, how: str) -> None:
        if self._backends.get(backend.name) is not backend:
            return
        del self._backends[backend.name]
        self.models_version += 1
        log.info("backend_removed", backend=backend.name, source=backend.source, how=how)
        for forget in self.on_removed:
            forget(backend)

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
        if self._leaving:  # a claim released may have been a draining backend's last
            self._forget_drained()
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

