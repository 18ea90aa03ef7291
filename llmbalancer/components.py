"""What the running balancer is made of, in one record: the composition root (``app``) builds it, and the
balancer's own routes (``web``) reach the parts they need through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmbalancer.batches import BatchRunner
from llmbalancer.config import Config
from llmbalancer.counters import Counters, LocalCounters
from llmbalancer.fleet.agents import Agents
from llmbalancer.fleet.dns_discovery import DnsDiscovery
from llmbalancer.fleet.health_poller import HealthPoller
from llmbalancer.fleet.registry import Registry
from llmbalancer.observe.gpu import GpuSampler
from llmbalancer.observe.metrics import Metrics
from llmbalancer.observe.recent import RecentRequests
from llmbalancer.observe.snapshot import build_snapshot
from llmbalancer.relay.proxy import Proxy
from llmbalancer.relay.tls import Certificates
from llmbalancer.reloading import Reloader
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.service import Service
from llmbalancer.state import Replicas
from llmbalancer.supervisor.instances import Supervisor


@dataclass
class Components:
    """Everything the app is made of, so routes and tests reach one another through one object."""

    config: Config
    registry: Registry
    dispatcher: Dispatcher
    proxy: Proxy
    poller: HealthPoller
    services: list[Service]
    gpu: GpuSampler
    recent: RecentRequests
    metrics: Metrics
    agents: Agents
    discovery: DnsDiscovery
    supervisor: Supervisor | None = None
    reloader: Reloader | None = None
    batches: BatchRunner | None = None
    # Replicas sharing state (``state.url``), or None: one process, everything in memory.
    replicas: Replicas | None = None
    # Counts per key and window (the API keys' limits): in Redis with replicas, else in memory.
    counters: Counters = field(default_factory=LocalCounters)
    tls: Certificates | None = None  # server.tls_cert / tls_key: the listening socket's certificate

    def snapshot(self) -> dict[str, Any]:
        """The monitor's one document (``GET /llmhealth-snapshot``), as things are now."""
        return build_snapshot(
            policy=self.config.policy.name,
            backends=self.registry,
            admission=self.dispatcher.admission,
            selector=self.dispatcher.selector,
            supervisor=self.supervisor,
            recent=self.recent,
            gpu=self.gpu,
            batches=self.batches,
            replicas=self.replicas.describe() if self.replicas is not None else None,
        )
