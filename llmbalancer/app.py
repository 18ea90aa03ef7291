"""The composition root: builds the registry, policy, proxy and services, and wires the routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from llmbalancer.batches import BatchApi, BatchRunner
from llmbalancer.components import Components
from llmbalancer.config import Config
from llmbalancer.fleet.agents import Agents
from llmbalancer.fleet.circuit import Circuit
from llmbalancer.fleet.dns_discovery import DnsDiscovery
from llmbalancer.fleet.health_poller import HealthPoller
from llmbalancer.fleet.membership import converge, spec_of
from llmbalancer.fleet.registry import Registry
from llmbalancer.observe.batch_metrics import BatchCollector
from llmbalancer.observe.gpu import GpuSampler
from llmbalancer.observe.key_metrics import KeyMetrics
from llmbalancer.observe.metrics import Metrics, metrics_handler
from llmbalancer.observe.recent import RecentRequests
from llmbalancer.relay.access import add_limit_headers
from llmbalancer.relay.proxy import Proxy
from llmbalancer.relay.tls import Certificates
from llmbalancer.reloading import ConfigSource, Reloader
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.model_routing import ModelRouter
from llmbalancer.scheduling.selectors import make_selector
from llmbalancer.service import Service, running
from llmbalancer.state import Replicas
from llmbalancer.supervisor.instances import Supervisor
from llmbalancer.web.admin import add_admin_routes
from llmbalancer.web.batches import add_batch_routes
from llmbalancer.web.guard import expect_handler, guard
from llmbalancer.web.health import health_handler
from llmbalancer.web.keyed import observed, requester
from llmbalancer.web.llmhealth import llmhealth_handler
from llmbalancer.web.models import add_model_routes
from llmbalancer.web.monitor import monitor_handler
from llmbalancer.web.ollama import add_ollama_routes
from llmbalancer.web.snapshot import snapshot_handler

log = structlog.get_logger("llmbalancer.app")


COMPONENTS = web.AppKey("components", Components)
# Any path but /health, /metrics, /llmhealth*, /admin and /admin/* (matched on the decoded path).
_PROXIED = r"/{tail:(?!(?:health|metrics|admin)\Z|admin/|llmhealth).*}"


def build_components(config: Config, source: ConfigSource | None = None) -> Components:
    """Everything the balancer is made of. ``source``: what ``config`` was loaded from, for reloads."""
    registry = Registry(drain_timeout=config.server.drain_timeout)
    registry.circuit = Circuit(config.circuit)
    registry.circuit.on_reopen = registry.notify_change
    converge(registry, "config", [spec_of(b) for b in config.backends])  # every source registers the same way
    queue = config.queue.model_copy(update={"wait_for_backends": config.waits_for_backends})
    dispatcher = Dispatcher(registry, make_selector(config.policy), queue, routing=ModelRouter(config.routing))
    proxy = Proxy(config, registry, dispatcher)
    poller = HealthPoller(registry, config.health, config.timeouts)
    gpu = GpuSampler(config.gpu)
    agents = Agents(registry, config.agents)
    discovery = DnsDiscovery(registry, config.discovery)
    services: list[Service] = [poller, gpu, agents, discovery]
    recent = RecentRequests(config.monitor.recent_requests)
    metrics = Metrics(registry, dispatcher.routing)
    proxy.on_complete += [metrics.observe, recent.observe]
    components = Components(
        config, registry, dispatcher, proxy, poller, services, gpu=gpu, recent=recent, metrics=metrics,
        agents=agents, discovery=discovery,
    )
    metrics.watch(components.snapshot, registry)
    proxy.keys.limits.use(components.counters)  # the keys' minutes: in memory, or shared by replicas
    key_metrics = KeyMetrics(proxy.keys)
    proxy.on_complete.append(key_metrics.observe)
    metrics.registry.register(key_metrics)
    # Always there, so that a reload may add instances. Last in the list but for batches, so stopped almost
    # first: the proxy has drained by then (cleanup runs after it).
    components.supervisor = Supervisor(config.supervisor, config.instances, registry)
    services.append(components.supervisor)
    if Certificates.wanted(config.server):
        components.tls = Certificates(config.server)  # a pair that cannot be loaded stops the start, named
    components.reloader = Reloader(components, source)
    if config.batch.enabled:
        # After the supervisor, so stopped before it: lines still running are abandoned (pending, run again at the
        # next start) rather than failed by servers going away.
        components.batches = BatchRunner(config, registry, dispatcher, keys=proxy.keys)
        services.append(components.batches)
        metrics.registry.register(BatchCollector(components.batches))
    if config.state.url:
        _share(components)
    return components


def _share(components: Components) -> None:
    """Replicas on one Redis: one fleet, one slot count per backend, one memory, shared counters."""
    replicas = Replicas(components.config, components.registry, components.dispatcher, components.agents)
    components.replicas = replicas
    components.counters = replicas.counters
    components.proxy.keys.limits.use(replicas.counters)  # keys' requests and tokens per minute: counted once
    components.dispatcher.ledger = replicas.ledger
    if components.reloader is not None:
        components.reloader.on_policy.append(replicas.memory.adopt)
    # First in the list, so stopped last: its replica leaves once the others have stopped.
    components.services.insert(0, replicas)


def build_app(config: Config, source: ConfigSource | None = None) -> web.Application:
    components = build_components(config, source)
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[guard])
    app[COMPONENTS] = components
    app.router.add_get("/health", health_handler(components.registry))
    app.router.add_get("/llmhealth", llmhealth_handler(components.gpu))
    # With client keys configured, what the balancer knows of its traffic is for observers only (auth/rules.py).
    app.router.add_get("/llmhealth-snapshot", observed(components, snapshot_handler(components.snapshot)))
    app.router.add_get("/llmhealth-monitor", monitor_handler())
    app.router.add_get("/metrics", observed(components, metrics_handler(components.metrics)))
    add_admin_routes(app, components)
    add_model_routes(app, components)
    add_ollama_routes(app, components)
    if components.batches is not None:
        add_batch_routes(app, BatchApi(components.batches), owner_of=lambda request: _key_name(components, request))
        app.on_shutdown.append(_pause_batches)
    # Everything that is not the balancer's own goes to a backend, whatever the method. The balancer's own
    # paths never do: a method they do not answer is aiohttp's 405 (with Allow), another path under
    # theirs its 404 (both made OpenAI-style JSON by the guard).
    app.router.add_route(
        "*", _PROXIED, components.proxy.handle, expect_handler=expect_handler(config.server.max_body_bytes)
    )
    app.on_response_prepare.append(add_limit_headers)  # a keyed request's x-ratelimit-* headers, on any answer
    app.cleanup_ctx.append(_lifecycle)
    return app


def _key_name(components: Components, request: web.Request) -> str | None:
    key = requester(components, request)
    return None if key is None else key.name


async def _pause_batches(app: web.Application) -> None:
    """Draining: no new batch line starts; those running finish or are abandoned when the services stop."""
    batches = app[COMPONENTS].batches
    if batches is not None:
        batches.pause()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    components = app[COMPONENTS]
    if components.batches is not None:
        await components.batches.open()  # a data directory it cannot use stops the start, naming batch.dir
    session = components.proxy.open_session()
    try:
        if components.replicas is not None:
            # Join the others before serving: the first request sees the shared fleet (Redis away: alone).
            await components.replicas.join()
        # One round of probes before serving, so backends that are already up take the first request.
        async with asyncio.timeout(components.config.timeouts.health + 0.5):
            with contextlib.suppress(TimeoutError):
                await components.poller.poll_once(session)
        async with running(components.services):
            try:
                yield
            finally:
                if components.reloader is not None:
                    await components.reloader.close()
    finally:
        await session.close()
