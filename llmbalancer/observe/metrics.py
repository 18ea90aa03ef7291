"""Prometheus metrics for ``GET /metrics``: ``llmbalancer_`` prefix, base units, ``_total`` counters.

Two sources, so that nothing is added to the per-chunk loop:
- per finished request, ``Metrics.observe`` (a ``Proxy.on_complete`` observer) moves the request
  counters and histograms, kept as plain numbers and turned into families at scrape time
  (``RequestCollector``);
- at scrape time, ``FleetCollector`` reads the registry (through the snapshot builder, the one
  place that knows which fields exist yet) and turns the current state into gauges.

Each app owns its own ``CollectorRegistry``: several balancers in one process (the tests) never
share a series.

The ``model`` label comes from request bodies, so it names only models the fleet knows (``ModelLabels``);
any other name a client sends is counted under ``model="other"``: a client inventing names cannot grow
the exposition or the process.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.relay.access import MAX_TEXT, Access
from llmbalancer.scheduling.model_routing import ModelRouter, instances, served_names

CONTENT_TYPE = CONTENT_TYPE_LATEST

# LLM requests run from milliseconds (an error, a cached answer) to minutes (a long generation).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Models named only by a route's pattern (``"qwen.*"`` names many) get their own label up to this many.
MAX_ROUTED_LABELS = 100
OTHER_MODEL = "other"
REMOVED_BACKEND = "(removed)"


class _Histogram:
    """Per-bucket counts (not yet cumulative), sum and count: one bisect and three adds per observation."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in its bucket
        self.count += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        running = 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


# Names found served by no backend, remembered so that their next request costs a set lookup too.
MAX_UNSERVED_NAMES = 1024


class ModelLabels:
    """The ``model`` label of a request: its model when a backend serves it (declared ``models`` or discovered
    ``served_models``, instance aliases and Ollama's ``:latest`` as model routing reads them) or when a
    ``routing.models`` pattern names it (the first ``MAX_ROUTED_LABELS`` such names, each at most
    ``MAX_TEXT`` characters); else ``other``.

    Per request: a set lookup. The served set and the set of names found unserved (bounded) are filled as
    names are asked for and emptied when the registry's ``models_version`` moves (membership or a model
    list changed) or a reload replaces the routes."""

    def __init__(self, registry: Registry, routing: ModelRouter | None = None) -> None:
        self._registry = registry
        self.routing = routing  # replaced by a reload
        self._version = -1
        self._served: set[str] = set()
        self._routed: set[str] = set()
        self._unserved: set[str] = set()  # "other", known without a pass over the backends
        self._routing_seen = routing

    def __call__(self, model: str | None) -> str:
        if not model:
            return ""
        version = self._registry.models_version
        if version != self._version or self.routing is not self._routing_seen:
            self._version, self._routing_seen = version, self.routing
            self._served, self._unserved = set(), set()
        if model in self._served or model in self._routed:
            return model
        if model in self._unserved:
            return OTHER_MODEL
        if any(instances(model, served_names(b)) for b in self._registry):
            self._served.add(model)  # bounded: a few spellings of each name served
            return model
        routing = self.routing
        if (
            routing is not None and len(self._routed) < MAX_ROUTED_LABELS and len(model) <= MAX_TEXT
            and routing.route_for(model) is not None
        ):
            self._routed.add(model)
            return model
        if len(model) <= MAX_TEXT:
            if len(self._unserved) >= MAX_UNSERVED_NAMES:
                self._unserved.clear()  # invented names must not grow it without bound
            self._unserved.add(model)
        return OTHER_MODEL


class Metrics:
    """Request counters and histograms as plain ints and lists, moved per request without any label
    lookup or lock (prometheus-client's cost per request); ``RequestCollector`` turns them into the
    exposition's families at scrape time, under the same names, labels and buckets."""

    def __init__(self, backends: Registry, routing: ModelRouter | None = None) -> None:
        self.registry = CollectorRegistry()
        self._backends = backends
        self.model_label = ModelLabels(backends, routing)
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (backend, model, status)
        self.duration: dict[str, _Histogram] = {}  # by backend
        self.ttft: dict[str, _Histogram] = {}
        self.queue_wait = _Histogram(QUEUE_BUCKETS)
        self.prompt_tokens: dict[tuple[str, str], int] = defaultdict(int)  # (backend, model)
        self.completion_tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.retries = 0
        self.registry.register(RequestCollector(self))
        backends.on_removed.append(self.forget)

    def forget(self, backend: Backend) -> None:
        """``backend`` left the fleet: its series leave the exposition with it."""
        name = backend.name
        for request in [key for key in self.requests if key[0] == name]:
            del self.requests[request]
        for tokens in (self.prompt_tokens, self.completion_tokens):
            for key in [key for key in tokens if key[0] == name]:
                del tokens[key]
        self.duration.pop(name, None)
        self.ttft.pop(name, None)

    def observe(self, access: Access) -> None:
        """One finished request (``Proxy.on_complete``): a handful of dict updates, no I/O."""
        backend = access.backend or ""
        if backend and self._backends.get(backend) is None:
            # It left the fleet while this request ran (and its series with it): a new series per departed
            # backend would grow the exposition with every DNS or agent churn; one label holds them all.
            backend = REMOVED_BACKEND
        model = self.model_label(access.model)
        self.requests[backend, model, access.status] += 1
        started = access.started
        duration = self.duration.get(backend)
        if duration is None:
            duration = self.duration[backend] = _Histogram(DURATION_BUCKETS)
        duration.observe(max(0.0, (access.finished or started) - started))
        if access.ttfb is not None:
            ttft = self.ttft.get(backend)
            if ttft is None:
                ttft = self.ttft[backend] = _Histogram(TTFT_BUCKETS)
            ttft.observe(max(0.0, access.ttfb - started))
        if access.attempts > 1:
            self.retries += access.attempts - 1
        if access.prompt_tokens:
            self.prompt_tokens[backend, model] += access.prompt_tokens
        if access.completion_tokens:
            self.completion_tokens[backend, model] += access.completion_tokens
        if access.queue_wait is not None:
            self.queue_wait.observe(access.queue_wait)

    def watch(self, snapshot: Callable[[], dict[str, Any]], registry: Registry) -> None:
        """Add the fleet's gauges, read at scrape time from ``snapshot()`` and ``registry``."""
        self.registry.register(FleetCollector(snapshot, registry))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestCollector(Collector):
    """The request counters and histograms, as they are at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "llmbalancer_requests", "Requests finished, by backend, model and HTTP status.",
            labels=["backend", "model", "status"],
        )
        for (backend, model, status), count in list(m.requests.items()):
            requests.add_metric([backend, model, str(status)], float(count))
        yield requests
        yield _histogram(
            "llmbalancer_request_duration_seconds", "Time from request arrival to the end of the response.",
            m.duration,
        )
        yield _histogram(
            "llmbalancer_time_to_first_token_seconds",
            "Time from request arrival to the first response byte relayed (the first token when streaming).",
            m.ttft,
        )
        queue_wait = HistogramMetricFamily(
            "llmbalancer_queue_wait_seconds", "Time requests waited in the admission queue for a slot."
        )
        queue_wait.add_metric([], m.queue_wait.buckets(), m.queue_wait.sum)
        yield queue_wait
        for name, documentation, counts in (
            ("llmbalancer_prompt_tokens", "Prompt (input) tokens the backends reported.", m.prompt_tokens),
            ("llmbalancer_completion_tokens", "Completion (output) tokens the backends reported.",
             m.completion_tokens),
        ):
            family = CounterMetricFamily(name, documentation, labels=["backend", "model"])
            for (backend, model), count in list(counts.items()):
                family.add_metric([backend, model], float(count))
            yield family
        yield CounterMetricFamily(
            "llmbalancer_retries", "Attempts beyond the first: requests sent again to another backend.",
            value=float(m.retries),
        )


def _histogram(name: str, documentation: str, by_backend: dict[str, _Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["backend"])
    for backend, histogram in list(by_backend.items()):
        family.add_metric([backend], histogram.buckets(), histogram.sum)
    return family


class FleetCollector(Collector):
    """Gauges of the fleet as it is at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], registry: Registry) -> None:
        self._snapshot = snapshot
        self._registry = registry

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: the app may not be running yet

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        yield from _backend_metrics(snapshot["backends"])
        yield from _queue_metrics(snapshot["queue"])
        yield from _gpu_metrics(snapshot["gpu"])
        yield from _supervisor_metrics(snapshot["instances"])
        yield from _circuit_metrics(self._registry)
        yield from _state_metrics(snapshot)


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels or [])


def _backend_metrics(backends: list[dict[str, Any]]) -> Iterator[Metric]:
    up = _gauge("llmbalancer_backend_up", "1 while the backend takes requests (healthy or busy).", ["backend"])
    state = _gauge("llmbalancer_backend_state", "1 for the backend's current state.", ["backend", "state"])
    in_flight = _gauge("llmbalancer_backend_in_flight", "Requests this balancer has in flight.", ["backend"])
    slots_busy = _gauge("llmbalancer_backend_slots_busy", "Busy slots at the last poll.", ["backend"])
    slots_total = _gauge("llmbalancer_backend_slots_total", "Slots the backend has.", ["backend"])
    deferred = _gauge(
        "llmbalancer_backend_queue_depth", "Requests waiting inside the backend for a slot.", ["backend"]
    )
    score = _gauge(
        "llmbalancer_backend_health_score", "Health score, 0..1: falls on errors, rises on successes.", ["backend"]
    )
    for backend in backends:
        name = backend["name"]
        up.add_metric([name], 1.0 if backend["routable"] else 0.0)
        for each in BackendState:
            state.add_metric([name, each.value], 1.0 if backend["state"] == each.value else 0.0)
        in_flight.add_metric([name], backend["in_flight"])
        for family, key in ((slots_busy, "slots_busy"), (slots_total, "slots_total"),
                            (deferred, "queue_depth"), (score, "health_score")):
            if backend[key] is not None:  # unknown is absent, not a misleading 0
                family.add_metric([name], float(backend[key]))
    yield from (up, state, in_flight, slots_busy, slots_total, deferred, score)


def _queue_metrics(queue: dict[str, Any]) -> Iterator[Metric]:
    # Without an admission queue nothing ever waits: the depth is truly 0 (requests get 503 at once).
    yield GaugeMetricFamily(
        "llmbalancer_queue_depth", "Requests waiting in the admission queue (all models).", value=queue["depth"] or 0
    )
    if queue["capacity"] is not None:
        yield GaugeMetricFamily(
            "llmbalancer_queue_capacity", "Admission queue size per model.", value=queue["capacity"]
        )


def _gpu_metrics(gpu: dict[str, Any]) -> Iterator[Metric]:
    utilization = _gauge("llmbalancer_gpu_utilization_ratio", "Local GPU utilisation, 0 to 1.", ["gpu"])
    used = _gauge("llmbalancer_gpu_memory_used_bytes", "Local GPU memory in use.", ["gpu"])
    total = _gauge("llmbalancer_gpu_memory_total_bytes", "Local GPU memory.", ["gpu"])
    for device in gpu["gpus"]:
        label = [str(device["index"])]
        utilization.add_metric(label, device["utilization_pct"] / 100)
        used.add_metric(label, device["memory_used_bytes"])
        total.add_metric(label, device["memory_total_bytes"])
    yield from (utilization, used, total)
    yield GaugeMetricFamily(
        "llmbalancer_gpu_utilization_max_ratio",
        "Highest local GPU utilisation over the /llmhealth window, 0 to 1 (0 without NVML).",
        value=gpu["max_utilization_pct"] / 100,
    )
    yield GaugeMetricFamily(
        "llmbalancer_gpu_busy", "1 when /llmhealth says busy.", value=1.0 if gpu["status"] == "busy" else 0.0
    )


def _supervisor_metrics(instances: list[dict[str, Any]] | None) -> Iterator[Metric]:
    restarts = CounterMetricFamily(
        "llmbalancer_supervisor_restarts", "Restarts of supervised instances.", labels=["instance"]
    )
    for instance in instances or ():
        restarts.add_metric([str(instance.get("name", ""))], float(instance.get("restarts") or 0))
    yield restarts


def _circuit_metrics(registry: Registry) -> Iterator[Metric]:
    opens = CounterMetricFamily(
        "llmbalancer_circuit_opens", "Times a backend's circuit breaker opened.", labels=["backend"]
    )
    for backend in registry:
        opens.add_metric([backend.name], float(backend.breaker.opens))
    yield opens


def _state_metrics(snapshot: dict[str, Any]) -> Iterator[Metric]:
    store = snapshot.get("state_store")
    if store is None:  # a balancer on its own: no shared state to report
        return
    yield GaugeMetricFamily(
        "llmbalancer_state_store_up", "1 while the shared state (Redis) answers; 0: serving from local state.",
        value=1.0 if store["up"] else 0.0,
    )
    yield GaugeMetricFamily(
        "llmbalancer_replicas_up", "Replicas sharing the state seen alive at the last heartbeat, this one included.",
        value=float(sum(1 for r in snapshot["replicas"] or () if r["up"])),
    )
    elsewhere = _gauge(
        "llmbalancer_backend_in_flight_elsewhere", "Requests the other replicas have in flight.", ["backend"]
    )
    for backend in snapshot["backends"]:
        elsewhere.add_metric([backend["name"]], float(backend["in_flight_elsewhere"]))
    yield elsewhere


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return handle
