"""The snapshot: one JSON document with everything the monitor page shows (``GET /llmhealth-snapshot``),
and what the fleet gauges of ``/metrics`` are read from.

The field names are a contract (README, "Monitoring"; ``tests/test_snapshot.py`` checks them):
add fields, never rename or drop one (a field with a clearer new name keeps its old one, marked
deprecated: a backend's ``queue_depth`` is ``deferred``, requests waiting *inside* that backend, not
in the balancer's admission queue, which is the top-level ``queue``). A value not known is ``null``.
Sources:

- per backend, its views (``fleet/backend.py``): ``health`` (the poller's), ``traffic`` (the claim
  guard's), ``breaker`` (the circuit's);
- the admission queue (``depth()``, ``depths()``, ``max_size``, ``timeout``);
- sticky sessions: ``entries_count()`` on the selector;
- supervised instances: ``Supervisor.describe()`` (a list of dicts with ``name``, ``pid``, ``state``,
  ``restarts``, ``log_path``);
- batches: the runner's active batches (``BatchRunner.describe()``) and the slots its lines hold.
- replicas sharing state: ``state.Replicas.describe()`` (``replica``, ``replicas``, ``state_store``), passed
  in as plain data; all three ``null`` for a balancer on its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from llmbalancer.batches import BatchRunner
from llmbalancer.fleet.backend import Backend
from llmbalancer.observe.gpu import GpuSampler
from llmbalancer.observe.recent import RecentRequests
from llmbalancer.scheduling.admission import AdmissionQueue
from llmbalancer.scheduling.selectors import Selector
from llmbalancer.supervisor.instances import Supervisor

SCHEMA_VERSION = 1

BACKEND_FIELDS = (
    "name", "url", "kind", "state", "state_reason", "state_since", "routable",
    "slots_busy", "slots_total", "max_concurrency", "in_flight", "queue_depth",
    "circuit_state", "health_score", "models", "last_error", "requests_total", "errors_total",
    "latency_avg_s", "ttft_avg_s", "prompt_tokens_total", "completion_tokens_total", "cached_tokens_total",
    "gpu_busy", "deferred", "source", "in_flight_elsewhere",
)
REQUEST_FIELDS = (
    "time", "request_id", "method", "path", "model", "backend", "status", "attempts",
    "ttft_s", "duration_s", "prompt_tokens", "completion_tokens", "error", "key",
)
TOP_LEVEL_FIELDS = (
    "schema_version", "time", "policy", "backends", "instances", "sticky_entries", "queue", "requests", "gpu",
    "batches", "replica", "replicas", "state_store",
)
BATCHES_FIELDS = ("active", "slots_held", "slots_held_by_backend", "max_in_flight")
BATCH_FIELDS = (
    "id", "status", "endpoint", "model", "priority", "total", "completed", "failed", "in_flight", "rate_per_s",
    "eta_s", "created_at", "expires_at",
)


def describe_backend(backend: Backend) -> dict[str, Any]:
    return {
        "name": backend.name,
        "url": backend.url,
        "kind": backend.kind,
        "state": backend.state.value,
        "state_reason": backend.state_reason,
        "state_since": backend.state_since,
        "routable": backend.routable,
        "slots_busy": backend.health.slots_busy,
        "slots_total": backend.health.slots_total,
        "max_concurrency": backend.max_concurrency,
        "in_flight": backend.traffic.in_flight,
        # Deprecated name of "deferred" (requests waiting inside the backend, not in our admission queue).
        "queue_depth": backend.health.deferred,
        "circuit_state": backend.breaker.state.value,
        "health_score": backend.breaker.health_score,
        "models": list(dict.fromkeys([*backend.models, *backend.health.served_models])),
        "last_error": backend.traffic.last_error,
        "requests_total": backend.traffic.requests_total,
        "errors_total": backend.traffic.errors_total,
        "latency_avg_s": backend.traffic.latency_avg,
        # Time to the first response byte: for a streamed completion, its first token.
        "ttft_avg_s": backend.traffic.ttfb_avg,
        "prompt_tokens_total": backend.traffic.prompt_tokens_total,
        "completion_tokens_total": backend.traffic.completion_tokens_total,
        "cached_tokens_total": backend.traffic.cached_tokens_total,
        "gpu_busy": backend.health.gpu_busy,
        "deferred": backend.health.deferred,
        "source": backend.source,
        "in_flight_elsewhere": backend.in_flight_elsewhere,
    }


def describe_gpu(sampler: GpuSampler) -> dict[str, Any]:
    load = sampler.load()
    return {
        "status": load.status,
        "max_utilization_pct": load.max_utilization_pct,
        "threshold_pct": load.threshold_pct,
        "window_s": load.window_s,
        "nvml_available": load.nvml_available,
        "nvml_error": load.nvml_error,
        "gpus": [gpu.describe() for gpu in load.gpus],
        "samples": [
            {"time": s.time, "max_utilization_pct": s.max_utilization} for s in sampler.samples
        ],
    }


def describe_queue(admission: AdmissionQueue) -> dict[str, Any]:
    return {
        "depth": admission.depth(),
        "capacity": admission.max_size,
        "timeout_s": admission.timeout,
        "by_model": dict(admission.depths()),
    }


def build_snapshot(
    *,
    policy: str,
    backends: Iterable[Backend],
    admission: AdmissionQueue,
    selector: Selector,
    supervisor: Supervisor | None,
    recent: RecentRequests,
    gpu: GpuSampler,
    batches: BatchRunner | None = None,
    replicas: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "time": time.time(),
        "policy": policy,
        "backends": [describe_backend(backend) for backend in backends],
        "instances": None if supervisor is None or not supervisor.instances else [
            _instance(i) for i in supervisor.describe()
        ],
        "sticky_entries": selector.entries_count(),
        "queue": describe_queue(admission),
        "requests": [request.describe() for request in recent.newest_first()],
        "gpu": describe_gpu(gpu),
        "batches": None if batches is None else describe_batches(batches),
        "replica": replicas["replica"] if replicas else None,
        "replicas": replicas["replicas"] if replicas else None,
        "state_store": replicas["state_store"] if replicas else None,
    }


def describe_batches(runner: BatchRunner) -> dict[str, Any]:
    return {
        "active": runner.describe(),
        "slots_held": runner.gate.total,
        "slots_held_by_backend": dict(runner.gate.held),
        "max_in_flight": runner.config.max_in_flight,
    }


# The snapshot is open to any client of the balancer: an instance's command line and environment
# (which may carry API keys) stay behind the loopback-only admin routes.
INSTANCE_FIELDS = ("name", "url", "state", "reason", "pid", "restarts", "uptime_s", "last_exit", "log_path")


def _instance(described: dict[str, Any]) -> dict[str, Any]:
    return {key: described.get(key) for key in INSTANCE_FIELDS}
