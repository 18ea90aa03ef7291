"""Config reload (``SIGHUP``, ``POST /admin/reload``): load the configuration again, exactly as at start-up
(the same file, the environment and the original command-line flags on top: ``ConfigSource``), and apply
what changed.

An invalid configuration changes nothing: every problem is logged and returned, the old one keeps
serving. A valid one is applied as a diff, nothing else touched:

- backends (``backends``, ``backends_file``, ``server_list``): added, updated, or drained and removed,
  through ``membership.converge`` like every other source (a name another source holds is a problem);
- supervised instances: started, stopped (drained first) or restarted only where their own settings
  changed; the supervisor's settings apply to its next actions;
- policy and routes: a new selector or model router, built whole and swapped in for requests that arrive
  afterwards (a policy whose settings did not change keeps its memory: pins, prefix indexes);
- queue, timeouts, retries, limits, health checks, circuit breaker, agents, DNS discovery, the admin
  token, the client keys (``auth``, the keys file read again): read by each new request, probe or
  heartbeat from now on;
- the TLS certificate and key (``server.tls_cert``, ``tls_key``): read again, for connections made from now
  on (turning TLS on or off needs a restart);
- ``server.host``, ``server.port`` (and the rest of ``server`` but its drain and body limits), ``logging``,
  ``gpu``, ``monitor`` and ``state`` are reported as needing a restart and left alone.

Nothing here cuts a request in flight: removed backends drain, changed instances drain before restarting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from llmbalancer.config import Config, ConfigError
from llmbalancer.configure import load_config
from llmbalancer.fleet.agents import Agents
from llmbalancer.fleet.circuit import Circuit
from llmbalancer.fleet.dns_discovery import DnsDiscovery
from llmbalancer.fleet.health_poller import HealthPoller
from llmbalancer.fleet.membership import conflicts, converge, spec_of
from llmbalancer.fleet.registry import Registry
from llmbalancer.observe.metrics import Metrics
from llmbalancer.relay.proxy import Proxy
from llmbalancer.relay.tls import Certificates
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.model_routing import ModelRouter
from llmbalancer.scheduling.selectors import Selector, make_selector
from llmbalancer.supervisor.instances import Supervisor

log = structlog.get_logger("llmbalancer.reloading")

# Read once, at start-up: a change needs a restart.
RESTART_KEYS = (
    "server.host", "server.port", "server.keepalive_timeout", "server.header_timeout", "server.body_timeout",
    "logging", "gpu", "monitor", "state",
)
_FLEET_KEYS = ("backends", "backends_file", "server_list", "instances", "supervisor.commands_file")


class Parts(Protocol):
    """What a reload reaches into (``components.Components``)."""

    config: Config
    registry: Registry
    dispatcher: Dispatcher
    proxy: Proxy
    poller: HealthPoller
    metrics: Metrics
    agents: Agents
    discovery: DnsDiscovery
    supervisor: Supervisor | None
    tls: Certificates | None


@dataclass(frozen=True)
class ConfigSource:
    """What ``serve`` loaded its configuration from; a reload loads again from the same."""

    config_file: str | None = None
    environ: Mapping[str, str] | None = None  # None: the process's environment
    overrides: Mapping[str, Any] = field(default_factory=dict)  # the command-line flags
    default_commands_file: str | None = None

    def load(self) -> Config:
        return load_config(
            config_file=self.config_file, environ=self.environ, overrides=self.overrides,
            default_commands_file=self.default_commands_file,
        )


@dataclass
class Reloaded:
    ok: bool
    problems: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # dotted keys whose value changed
    changes: list[dict[str, object]] = field(default_factory=list)  # backends and instances
    needs_restart: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {"reloaded": self.ok, "problems": self.problems, "changed": self.changed,
                "changes": self.changes, "needs_restart": self.needs_restart}


class Reloader:
    def __init__(self, components: Parts, source: ConfigSource | None) -> None:
        self._components = components
        self._source = source
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[object]] = set()  # instance stops and restarts under way
        # Called with the new selector when a reload swaps the policy (replicas share its memory: app.py).
        self.on_policy: list[Callable[[Selector], object]] = []

    async def reload(self) -> Reloaded:
        async with self._lock:
            if self._source is None:
                return Reloaded(False, ["this balancer was not started from a configuration it can load again"])
            try:
                new = self._source.load()
            except ConfigError as exc:
                problems = [str(problem) for problem in exc.problems]
                log.error("config_reload_failed", problems=problems)
                return Reloaded(False, problems)
            result = self.apply(new)
            if result.ok:
                log.info("config_reloaded", changed=result.changed, changes=result.changes,
                         needs_restart=result.needs_restart)
            else:
                log.error("config_reload_failed", problems=result.problems)
            return result

    def apply(self, new: Config) -> Reloaded:
        c = self._components
        old = c.config
        specs = [spec_of(b) for b in new.backends]
        taken = {i.name for i in new.instances} & {b.name for b in new.backends}
        problems = [f"backends: {conflict.message}" for conflict in conflicts(c.registry, "config", specs)]
        problems += [f"instances: {name!r} is also a backend's name" for name in sorted(taken)]
        held = [i.name for i in new.instances if (b := c.registry.get(i.name)) is not None and b.source != "instance"]
        problems += [f"instances: {name!r} is registered by another source" for name in held]
        if problems:
            return Reloaded(False, problems)
        tls_toggled = Certificates.wanted(new.server) != (c.tls is not None)
        if c.tls is not None and Certificates.wanted(new.server):
            try:
                c.tls.reload(new.server)  # before anything else changes: a pair that does not load changes nothing
            except ConfigError as exc:
                return Reloaded(False, [str(problem) for problem in exc.problems])
        changed = _changed_keys(old.as_dict(), new.as_dict())
        if new.admin.token != old.admin.token and "admin.token" not in changed:
            changed.append("admin.token")  # masked alike in as_dict
        if new.auth != old.auth and not any(k.startswith("auth.") for k in changed):
            changed.append("auth.keys")  # a secret changed (masked alike), or the keys file's content
        result = Reloaded(True, changed=[k for k in changed if not k.startswith(_FLEET_KEYS)])
        result.needs_restart = [k for k in changed if k.startswith(RESTART_KEYS)]
        if tls_toggled:
            result.needs_restart.append("server.tls_cert")  # TLS on or off: the listening socket is made anew

        c.registry.drain_timeout = new.server.drain_timeout
        moved = converge(c.registry, "config", specs, reason="removed from the configuration")
        result.changes += [change.describe() for change in moved if change.action != "unchanged"]
        result.changes += self._instances(new)
        dispatcher = c.dispatcher
        if new.policy != old.policy:
            dispatcher.selector = make_selector(new.policy)
            for observer in self.on_policy:
                observer(dispatcher.selector)
        if new.routing != old.routing:
            dispatcher.routing = c.metrics.model_label.routing = ModelRouter(new.routing)
        dispatcher.admission.max_size = new.queue.max_size
        dispatcher.admission.timeout = new.queue.timeout
        dispatcher.wait_for_backends = new.waits_for_backends
        dispatcher.binder.window = max(1, new.queue.bind_window)
        dispatcher.binder.max_pass_over = new.queue.max_pass_over
        dispatcher.server_backlog = new.queue.server_backlog
        c.proxy.configure(new)
        c.poller.configure(new.health, new.timeouts)
        if new.circuit != old.circuit:
            circuit = Circuit(new.circuit)
            circuit.on_reopen = c.registry.notify_change
            c.registry.circuit = circuit
        c.agents.configure(new.agents)
        c.discovery.configure(new.discovery)
        c.config = new
        return result

    def _instances(self, new: Config) -> list[dict[str, object]]:
        supervisor = self._components.supervisor
        if supervisor is None:
            return []
        supervisor.configure(new.supervisor)
        wanted = {ic.name: ic for ic in new.instances}
        changes: list[dict[str, object]] = []
        for name, instance in list(supervisor.instances.items()):
            if name not in wanted:
                self._spawn(supervisor.remove(name), f"stop:{name}")
                changes.append({"action": "stopped", "instance": name})
            elif wanted[name] != instance.config:
                self._spawn(supervisor.restart(name, wanted[name]), f"restart:{name}")
                changes.append({"action": "restarted", "instance": name})
        for name, ic in wanted.items():
            if name not in supervisor.instances:
                supervisor.add(ic)
                changes.append({"action": "started", "instance": name})
        return changes

    def _spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        task = asyncio.create_task(work, name=f"reload-{name}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Shutdown: what a reload started (instance stops and restarts) is cancelled and awaited."""
        for task in list(self._pending):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in dict.fromkeys([*old, *new]):
        dotted = f"{prefix}{key}"
        before, after = old.get(key), new.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            keys += _changed_keys(before, after, dotted + ".")
        elif before != after:
            keys.append(dotted)
    return keys
