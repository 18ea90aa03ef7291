"""``llmbalancer agent``: runs beside one inference server and keeps it registered with one or more balancers.

Every ``--interval`` seconds it probes the server where it runs, with the probes the balancer's poller
uses (``fleet/probes.py``: health, slots, models), and sends each balancer a heartbeat,
``PUT /admin/agents/{name}`` (``fleet/agents.Heartbeat``: the URL balancers reach the server at, ready or
not, slots total and busy, models). It sends nothing until the server first answers ready, so a server
still loading is never registered. Once registered, a probe that fails is reported as not ready in the
heartbeat that follows at once, so balancers stop routing to it within one interval. A balancer that is
down or refuses is retried with backoff (the interval, doubling to ``_MAX_BACKOFF``), for ever. On
SIGTERM or SIGINT it deregisters from every balancer (``DELETE /admin/agents/{name}``) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.health_poller import write_health
from llmbalancer.fleet.probes import Observation, ProbeMemory, probe
from llmbalancer.fleet.registry import Registry

log = structlog.get_logger("llmbalancer.agent")

_MAX_BACKOFF = 5.0
_DEREGISTER_TIMEOUT = 2.0


@dataclass(frozen=True)
class AgentOptions:
    local: str  # where the agent reaches its server
    balancers: tuple[str, ...]
    external: str  # where the balancers reach it
    name: str
    interval: float = 1.0
    token: str | None = None
    kind: str = "auto"
    probe_timeout: float = 2.0
    api_key: str | None = field(default=None, repr=False)  # the server's own --api-key


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        # The agent's own view of its one server, kept as the poller keeps a backend's (write_health).
        self._fleet = Registry()
        self._server = self._fleet.add(
            Backend(options.name, options.local, options.kind, api_key=options.api_key, source="agent")
        )
        self._memory = ProbeMemory()
        self._beat: dict[str, Any] | None = None  # the latest heartbeat; None until the server was first ready
        self._version = 0
        self._news = asyncio.Condition()

    def heartbeat(self, seen: Observation) -> dict[str, Any]:
        health = self._server.health
        return {
            "url": self.options.external,
            "ready": seen.ok is True,
            "reason": "" if seen.ok else (seen.reason or "not ready")[:500],
            "kind": self.options.kind,
            "slots_total": health.slots_total,
            "slots_busy": health.slots_busy,
            "deferred": health.deferred,
            "models": list(health.served_models),
            "detected_kind": health.detected_kind,
            **({"api_key": self.options.api_key} if self.options.api_key else {}),
        }

    async def run(self, stop: asyncio.Event) -> None:
        options = self.options
        probes = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=options.probe_timeout), connector=aiohttp.TCPConnector(force_close=True)
        )
        headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(2.0, options.interval * 2)),
                                        headers=headers)
        async with probes, session:
            senders = [
                asyncio.create_task(self._send(session, url), name=f"heartbeat:{url}") for url in options.balancers
            ]
            try:
                while not stop.is_set():
                    await self._probe(probes)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(options.interval):
                            await stop.wait()
            finally:
                for task in senders:
                    task.cancel()
                for task in senders:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if self._beat is not None:
                    await asyncio.gather(*(self._deregister(session, url) for url in options.balancers))

    async def _probe(self, session: aiohttp.ClientSession) -> None:
        seen = await probe(session, self._server, self._memory)
        if seen.ok:
            write_health(self._fleet, self._server, seen)
        if self._beat is None and not seen.ok:
            return  # never ready yet: nothing to register
        if self._beat is None:
            log.info("server_ready", server=self.options.local, name=self.options.name)
        elif self._beat["ready"] and not seen.ok:
            log.warning("server_not_ready", server=self.options.local, reason=seen.reason)
        async with self._news:
            self._beat = self.heartbeat(seen)
            self._version += 1
            self._news.notify_all()

    async def _send(self, session: aiohttp.ClientSession, balancer: str) -> None:
        """Send each new heartbeat to ``balancer``; when it fails, retry with backoff (for ever)."""
        url = f"{balancer.rstrip('/')}/admin/agents/{self.options.name}"
        sent = 0
        delay = self.options.interval
        failing: str | None = None
        while True:
            async with self._news:
                await self._news.wait_for(lambda sent=sent: self._version > sent)  # type: ignore[misc]
                beat, version = self._beat, self._version
            try:
                async with session.put(url, json=beat) as reply:
                    if reply.status >= 400:
                        raise _Refused(f"HTTP {reply.status}: {(await reply.text())[:300]}")
            except (aiohttp.ClientError, TimeoutError, _Refused) as exc:
                why = str(exc) or type(exc).__name__
                if failing != why:
                    log.warning("balancer_unreachable", balancer=balancer, error=why, retry_in_s=delay)
                failing = why
                await asyncio.sleep(delay)
                delay = min(delay * 2, max(_MAX_BACKOFF, self.options.interval))
                continue
            if failing is not None or sent == 0:
                log.info("registered", balancer=balancer, name=self.options.name, url=self.options.external)
            failing, sent, delay = None, version, self.options.interval

    async def _deregister(self, session: aiohttp.ClientSession, balancer: str) -> None:
        url = f"{balancer.rstrip('/')}/admin/agents/{self.options.name}"
        try:
            async with asyncio.timeout(_DEREGISTER_TIMEOUT), session.delete(url) as reply:
                log.info("deregistered", balancer=balancer, status=reply.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("deregister_failed", balancer=balancer, error=str(exc) or type(exc).__name__)


class _Refused(Exception):
    pass


async def run_agent(options: AgentOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("agent_started", name=options.name, local=options.local, external=options.external,
             balancers=list(options.balancers), interval_s=options.interval)
    await Agent(options).run(stop)
    log.info("agent_stopped", name=options.name)
    return 0
