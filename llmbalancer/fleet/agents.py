"""Service: the backends that agents register, kept by their heartbeats.

An agent (``llmbalancer agent``, beside one server) probes its server where it runs, with the poller's
probes (``fleet/probes.py``), and sends ``PUT /admin/agents/{name}`` every interval with what it saw: a
``Heartbeat``. It sends the first only once its server is ready, which registers the backend (source
``agent``, through ``membership.register``). Each heartbeat writes the backend's ``health`` view
(``write_health``, as a probe's answer would; the poller leaves agents' backends alone, so the view has
one writer) and its state: ready is healthy, not ready is unhealthy at once (the agent saw its server
stop answering). No heartbeat for ``agents.ttl`` seconds: the backend is removed (drained). An agent that
stops deregisters (``DELETE /admin/agents/{name}``).

Replicas sharing state hear each other's agents: every heartbeat and deregistration received here is told
to ``on_heard`` (``state/fleet_sync.py`` passes it on), and one passed on by another replica is applied
with ``relayed=True`` (not told again), so an agent may heartbeat to any one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmbalancer.config import AgentsConfig, BackendKind, http_url
from llmbalancer.fleet.backend import BackendSpec, BackendState
from llmbalancer.fleet.health_poller import write_health
from llmbalancer.fleet.membership import Change, register
from llmbalancer.fleet.probes import MAX_MODEL_NAME, MAX_MODELS, MAX_SLOTS, Observation
from llmbalancer.fleet.registry import Registry

log = structlog.get_logger("llmbalancer.fleet.agents")

SOURCE = "agent"


class Heartbeat(BaseModel):
    """What an agent says of its server (the body of ``PUT /admin/agents/{name}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="where the balancer reaches the server (the agent's --external)")
    ready: bool = Field(description="the server answered its health probe as ready")
    reason: str = Field("", max_length=500, description="why not ready")
    kind: BackendKind = "auto"
    max_concurrency: int | None = Field(None, ge=1)
    slots_total: int | None = Field(None, ge=0, le=MAX_SLOTS)
    slots_busy: int | None = Field(None, ge=0, le=MAX_SLOTS)
    deferred: int | None = Field(None, ge=0)
    models: tuple[str, ...] | None = Field(None, max_length=MAX_MODELS, description="served, as probed")
    detected_kind: str | None = Field(None, max_length=32, description="what an auto server was found to be")
    api_key: str | None = Field(
        None, min_length=1, max_length=4096, repr=False, description="the server's own key, sent on requests to it"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return http_url(url)

    @field_validator("models")
    @classmethod
    def _models(cls, models: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if models is not None and any(not name or len(name) > MAX_MODEL_NAME for name in models):
            raise ValueError(f"model names must be 1 to {MAX_MODEL_NAME} characters")
        return models

    def observation(self) -> Observation:
        return Observation(
            True, slots_total=self.slots_total, slots_busy=self.slots_busy, deferred=self.deferred,
            models=self.models, kind=self.detected_kind,
        )


class Agents:
    name = "agents"

    def __init__(self, registry: Registry, config: AgentsConfig | None = None) -> None:
        self._registry = registry
        self._ttl = (config or AgentsConfig()).ttl
        self._seen: dict[str, float] = {}  # agent name -> monotonic time of its last heartbeat
        self._changed = asyncio.Event()
        # Called with (name, heartbeat) for each heartbeat received here, (name, None) for a deregistration.
        self.on_heard: list[Callable[[str, Heartbeat | None], object]] = []

    def configure(self, config: AgentsConfig) -> None:
        self._ttl = config.ttl
        self._changed.set()

    def heartbeat(self, name: str, beat: Heartbeat, *, relayed: bool = False) -> Change:
        """Register or refresh agent ``name``'s backend; raises ``membership.Conflict`` when another source
        holds the name. ``relayed``: another replica received it."""
        spec = BackendSpec(name, beat.url, beat.kind, beat.max_concurrency, api_key=beat.api_key)
        change = register(self._registry, spec, SOURCE)
        if not relayed:
            for observer in self.on_heard:
                observer(name, beat)
        if name not in self._seen:
            log.info("agent_registered" if change.action == "added" else "agent_back", agent=name, url=beat.url)
        self._seen[name] = time.monotonic()
        backend = self._registry.get(name)
        assert backend is not None
        if beat.ready:
            write_health(self._registry, backend, beat.observation())
            if not backend.routable:
                self._registry.circuit.reset(backend)  # ready again after an outage: take it back at once
                self._registry.set_state(backend, BackendState.HEALTHY, "")
        else:
            state = BackendState.UNHEALTHY if backend.routable else backend.state
            self._registry.set_state(backend, state, beat.reason or "its agent reports the server not ready")
        return change

    def deregister(self, name: str, *, relayed: bool = False) -> bool:
        """The agent is stopping: drain and remove its backend. False when no agent has that name."""
        self._seen.pop(name, None)
        backend = self._registry.get(name)
        if backend is None or backend.source != SOURCE:
            return False
        if not relayed:
            for observer in self.on_heard:
                observer(name, None)
        log.info("agent_deregistered", agent=name)
        self._registry.remove(name, "its agent deregistered")
        return True

    async def run(self) -> None:
        """Remove the backends whose agent went silent for ``ttl`` seconds. Every heartbeat sets its deadline
        ``ttl`` ahead, so no new one is ever due before the earliest known: sleep until that one."""
        while True:
            now = time.monotonic()
            for name in [n for n, seen in self._seen.items() if now - seen >= self._ttl]:
                del self._seen[name]
                backend = self._registry.get(name)
                if backend is not None and backend.source == SOURCE:
                    log.warning("agent_expired", agent=name, ttl_s=self._ttl)
                    self._registry.remove(name, f"no heartbeat from its agent for {self._ttl:g} s")
            earliest = min(self._seen.values(), default=now)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, earliest + self._ttl - time.monotonic())):
                    await self._changed.wait()
