"""Service: launches the configured servers, restarts them when they exit, and stops them last.

Every instance is a backend in the registry from launch on: *starting* until the health poller sees
its ``/health`` say ready, then routable. One task per instance runs its life (spawn, watch, restart
with backoff 1 s doubling to 60 s, reset once it stayed ready for a while; too many crashes in a
window and it is *failed*, its log tail logged). Cancelling that task is the only way to stop it: its
``finally`` sends SIGTERM to the process group, waits a grace period, then SIGKILL. Operator stops
drain first (no new requests, wait for in-flight ones), and on shutdown the app stops this service
only after the proxy drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from yarl import URL

from llmbalancer.config import InstanceConfig, SupervisorConfig
from llmbalancer.config.commands_file import api_key_of, safe_name
from llmbalancer.fleet.backend import Backend, BackendSpec, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.supervisor import child_process
from llmbalancer.supervisor.output_log import OutputLog

log = structlog.get_logger("llmbalancer.supervisor.instances")

# After the process exits, how long its output pipe may stay open (held by something it forked).
_PUMP_LINGER = 2.0
_PORT_CHECK_EVERY = 0.5


class InstanceStatus(StrEnum):
    """An instance's one status (its backend's routing state is the registry's, beside it)."""

    STARTING = "starting"  # process alive, not ready since it started
    RUNNING = "running"  # has been ready since it was (re)started
    BACKOFF = "backoff"  # exited; waiting to be restarted
    STOPPED = "stopped"  # stopped by an operator, or exited as its restart policy allows
    FAILED = "failed"  # cannot start, or crashed too often: waits for an operator


@dataclass(eq=False)
class Instance:
    config: InstanceConfig
    backend: Backend
    output: OutputLog
    status: InstanceStatus = InstanceStatus.STOPPED
    reason: str = ""
    process: asyncio.subprocess.Process | None = None
    started_at: float | None = None  # monotonic
    ready_at: float | None = None  # monotonic: first ready since the last start
    restarts: int = 0
    last_exit: int | None = None
    task: asyncio.Task[None] | None = None
    pump: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def booting(self) -> bool:
        """Launched (the process about to be spawned, or alive) and not yet ready since: refused connections
        mean "not listening yet". The poller probes a backend from the moment it is added."""
        return self.status is InstanceStatus.STARTING and (self.process is None or self.alive)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.config.url,
            "state": self.status.value,
            "backend_state": self.backend.state.value,
            "reason": self.reason,
            "pid": self.process.pid if self.alive and self.process else None,
            "restarts": self.restarts,
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.alive and self.started_at else None,
            "last_exit": self.last_exit,
            "log_path": str(self.output.path),
            "command": list(self.config.command),
        }


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    name = "supervisor"

    def __init__(
        self,
        config: SupervisorConfig,
        instances: tuple[InstanceConfig, ...],
        registry: Registry,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        # Children inherit the balancer's environment; an instance's `env` is laid over it.
        self._environ = environ
        self.instances: dict[str, Instance] = {ic.name: self._instance(ic) for ic in instances}
        # An instance is running from the moment its backend first turns routable, not some loop turns
        # later when _await_ready wakes: anyone who sees the backend routable sees the instance running.
        registry.on_state.append(self._backend_state_changed)

    def _instance(self, ic: InstanceConfig) -> Instance:
        config = self._config
        path = Path(config.output_dir) / f"{safe_name(ic.name)}.log"
        output = OutputLog(path, config.log_max_bytes, config.log_backups)
        backend = Backend(name=ic.name, url=ic.url, kind="llamacpp", api_key=api_key_of(ic.command), source="instance")
        instance = Instance(ic, backend, output)
        instance.backend.instance = instance
        return instance

    def _backend_state_changed(self, backend: Backend, previous: BackendState) -> None:
        instance = self.instances.get(backend.name)
        if instance is None or instance.backend is not backend or not backend.routable:
            return
        if instance.status is InstanceStatus.STARTING and instance.alive:
            instance.status, instance.reason = InstanceStatus.RUNNING, ""
            instance.ready_at = time.monotonic()

    async def run(self) -> None:
        for instance in self.instances.values():
            self._launch(instance)
        try:
            await asyncio.Event().wait()
        finally:
            # Shutdown: the proxy has drained already (aiohttp finishes handlers before cleanup).
            for instance in self.instances.values():
                if self._registry.get(instance.name) is instance.backend:
                    self._registry.set_state(instance.backend, BackendState.DRAINING, "shutting down")
            await asyncio.gather(*(self._halt(i) for i in self.instances.values()))
            for instance in self.instances.values():
                instance.output.close()
            log.info("supervisor_stopped", instances=len(self.instances))

    def describe(self) -> list[dict[str, object]]:
        """Every instance, for the admin list and the snapshot."""
        return [instance.describe() for instance in self.instances.values()]

    # --- operator actions (admin routes, reload) ----------------------------------------------

    def configure(self, config: SupervisorConfig) -> None:
        """New supervisor settings (a reload): for every stop, restart and log rotation from now on."""
        self._config = config

    def add(self, ic: InstanceConfig) -> Instance:
        """A new instance (a reload listed it): launched now."""
        instance = self.instances[ic.name] = self._instance(ic)
        self._launch(instance)
        return instance

    async def remove(self, name: str) -> None:
        """Stop instance ``name`` (draining it first) and forget it (a reload no longer lists it)."""
        instance = self.instances.pop(name)
        try:
            await self._stop(instance)
        finally:
            await self._halt(instance)  # cancelled while draining (shutdown): the process goes all the same
            instance.output.close()

    async def stop(self, name: str) -> Instance:
        return await self._stop(self.instances[name])

    async def _stop(self, instance: Instance) -> Instance:
        async with instance.lock:
            await self._drain(instance, "stopping")
            await self._halt(instance)
            instance.status, instance.reason = InstanceStatus.STOPPED, "stopped by operator"
            if self._registry.get(instance.name) is instance.backend:
                self._registry.remove(instance.name)
            log.info("instance_stopped", instance=instance.name)
        return instance

    async def start(self, name: str) -> Instance:
        instance = self.instances[name]
        async with instance.lock:
            if instance.task is None or instance.task.done():
                self._launch(instance)
        return instance

    async def restart(self, name: str, config: InstanceConfig | None = None) -> Instance:
        """Drain, stop and launch again; with ``config`` (a reload changed its settings), launched with it."""
        instance = self.instances[name]
        async with instance.lock:
            await self._drain(instance, "restarting")
            await self._halt(instance)
            if config is not None:
                instance.config = config
                backend = instance.backend
                if self._registry.get(name) is backend:
                    spec = BackendSpec(name, config.url, backend.kind, api_key=api_key_of(config.command))
                    self._registry.update(name, spec)
                else:
                    backend.url = config.url  # not registered: nobody routes to it meanwhile
            self._launch(instance)
        return instance

    async def _drain(self, instance: Instance, why: str) -> None:
        """Take no new requests, then wait (bounded) for the ones in flight to finish."""
        backend = instance.backend
        if self._registry.get(instance.name) is not backend:
            return
        self._registry.set_state(backend, BackendState.DRAINING, why)
        try:
            async with asyncio.timeout(self._config.drain_timeout):
                while backend.traffic.in_flight:
                    await self._registry.next_change()
        except TimeoutError:
            log.warning("instance_drain_timeout", instance=instance.name, in_flight=backend.traffic.in_flight)

    async def _halt(self, instance: Instance) -> None:
        task = instance.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- one instance's life ------------------------------------------------------------------

    def _launch(self, instance: Instance) -> None:
        backend = instance.backend
        self._registry.set_state(backend, BackendState.STARTING, "launching")
        if self._registry.get(instance.name) is None:
            self._registry.add(backend)
        instance.status, instance.reason = InstanceStatus.STARTING, ""
        instance.process = None  # the previous one, if any, has exited: this launch's is not spawned yet
        instance.task = asyncio.create_task(self._supervise(instance), name=f"supervise:{instance.name}")

    async def _supervise(self, instance: Instance) -> None:
        config = self._config
        delay = config.restart_backoff
        crashes: deque[float] = deque()
        try:
            while True:
                if not await self._port_free(instance):
                    return
                try:
                    process = await self._start(instance)
                except OSError as exc:
                    self._fail(instance, f"cannot start {instance.config.command[0]}: {exc.strerror or exc}")
                    log.error(
                        "instance_cannot_start", instance=instance.name, path=instance.config.command[0],
                        error=exc.strerror or str(exc), cwd=instance.config.cwd or os.getcwd(),
                    )
                    return
                ready_at = await self._watch(instance, process)
                code = await process.wait()
                await self._close_output(instance)
                now = time.monotonic()
                instance.last_exit = code
                if ready_at is not None and now - ready_at >= config.backoff_reset:
                    delay = config.restart_backoff
                    crashes.clear()
                if not _restarts(instance.config.restart, code):
                    self._exited_for_good(instance, code)
                    return
                crashes.append(now)
                while crashes and now - crashes[0] > config.restart_window:
                    crashes.popleft()
                if len(crashes) > config.max_restarts:
                    self._fail(instance, f"crashed {len(crashes)} times within {config.restart_window:g} s")
                    log.error(
                        "instance_failed", instance=instance.name, last_exit=describe_exit(code),
                        crashes=len(crashes), window_s=config.restart_window, log=str(instance.output.path),
                        log_tail=instance.output.tail(),
                    )
                    return
                why = f"{describe_exit(code)}; restarting in {delay:g} s"
                instance.status, instance.reason = InstanceStatus.BACKOFF, why
                self._registry.set_state(instance.backend, BackendState.UNHEALTHY, why)
                log.warning("instance_exited", instance=instance.name, exit=describe_exit(code), restart_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, config.restart_backoff_max)
                instance.restarts += 1
        finally:
            # Cancelled (stop, restart, shutdown) or finished: never leave the process behind.
            if instance.process is not None and instance.process.returncode is None:
                code = await child_process.terminate(instance.process, config.stop_grace)
                instance.last_exit = code
                log.info("instance_terminated", instance=instance.name, exit=describe_exit(code))
            await self._close_output(instance)

    async def _port_free(self, instance: Instance) -> bool:
        """Whether the instance's port is free to launch on, waiting (up to ``stop_grace``) for another
        process to let go of it.

        Why: a server launched onto a port another process listens on fails to bind, and meanwhile the
        health poller would find that other process healthy under this instance's name and route to it.
        The usual holder is a previous run's instance still stopping, hence the wait of one stop grace.
        """
        url = URL(instance.config.url)
        host, port = url.host or "127.0.0.1", url.port or 80
        if not await child_process.listening(host, port):
            return True
        why = f"port {port} is in use by another process"
        self._fail(instance, f"{why}; waiting up to {self._config.stop_grace:g} s for it to be free")
        log.warning("instance_port_in_use", instance=instance.name, port=port, wait_s=self._config.stop_grace)
        deadline = time.monotonic() + self._config.stop_grace
        while time.monotonic() < deadline:
            await asyncio.sleep(_PORT_CHECK_EVERY)
            if not await child_process.listening(host, port):
                return True
        self._fail(instance, f"{why}; not started (free it, then POST /admin/instances/{instance.name}/start)")
        log.error("instance_not_started", instance=instance.name, reason=why, url=instance.config.url)
        return False

    async def _start(self, instance: Instance) -> asyncio.subprocess.Process:
        ic = instance.config
        attempt = f" (restart {instance.restarts})" if instance.restarts else ""
        instance.output.mark(f"starting {ic.name}{attempt}: {' '.join(ic.command)}")
        env = {**(self._environ if self._environ is not None else os.environ), **ic.env} if ic.env else None
        process = await child_process.spawn(ic.command, env=env, cwd=ic.cwd)
        assert process.stdout is not None
        instance.process = process
        output = child_process.pump(process.stdout, instance.output.write)
        instance.pump = asyncio.create_task(output, name=f"output:{ic.name}")
        instance.started_at = time.monotonic()
        instance.ready_at = None
        instance.status, instance.reason = InstanceStatus.STARTING, ""
        self._registry.set_state(instance.backend, BackendState.STARTING, f"pid {process.pid} starting")
        log.info("instance_started", instance=ic.name, pid=process.pid, url=ic.url, log=str(instance.output.path))
        return process

    async def _watch(self, instance: Instance, process: asyncio.subprocess.Process) -> float | None:
        """Wait until it exits; returns when it first became ready (None: never)."""
        exited = asyncio.ensure_future(process.wait())
        try:
            ready_at = await self._await_ready(instance, process, exited)
            await exited
            return ready_at
        finally:
            exited.cancel()

    async def _close_output(self, instance: Instance) -> None:
        """Let the pump copy what the process wrote before it exited (bounded), then end it."""
        pump, instance.pump = instance.pump, None
        if pump is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_PUMP_LINGER):
                await asyncio.shield(pump)
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        code = instance.process.returncode if instance.process else None
        instance.output.mark(f"{instance.name} exited ({describe_exit(code) if code is not None else 'unknown'})")

    async def _await_ready(
        self, instance: Instance, process: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> float | None:
        limit = instance.config.ready_timeout
        deadline = time.monotonic() + limit if limit else None
        while not exited.done():
            if instance.status is InstanceStatus.RUNNING and instance.ready_at is not None:
                started = instance.started_at or instance.ready_at
                log.info("instance_ready", instance=instance.name, pid=process.pid,
                         startup_s=round(instance.ready_at - started, 2))
                return instance.ready_at
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                log.error("instance_not_ready", instance=instance.name, ready_timeout_s=limit,
                          log_tail=instance.output.tail(5))
                await child_process.terminate(process, self._config.stop_grace)
                return None
            change = self._registry.next_change()
            waiters: set[asyncio.Future[Any]] = {exited, change}
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                change.cancel()
        return None

    def _fail(self, instance: Instance, why: str) -> None:
        instance.status, instance.reason = InstanceStatus.FAILED, why
        self._registry.set_state(instance.backend, BackendState.FAILED, why)

    def _exited_for_good(self, instance: Instance, code: int) -> None:
        why = f"{describe_exit(code)} (restart: {instance.config.restart})"
        if code == 0:
            instance.status, instance.reason = InstanceStatus.STOPPED, why
            self._registry.remove(instance.name)
            log.info("instance_exited", instance=instance.name, exit=describe_exit(code), restart=False)
        else:
            self._fail(instance, why)
            log.error("instance_failed", instance=instance.name, reason=why, log_tail=instance.output.tail())


def _restarts(policy: str, code: int) -> bool:
    return policy == "always" or (policy == "on-failure" and code != 0)
