"""Per client key (``auth/``), in ``/metrics``: requests finished by key and status (429s are the key's
limits at work), tokens by key, and requests in flight by key, read at scrape time. Keys are named by their
``name``, never the key; the label's values are the configured names, so the series are bounded."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmbalancer.auth.gate import KeyGate
from llmbalancer.relay.access import Access


class KeyMetrics(Collector):
    def __init__(self, gate: KeyGate) -> None:
        self._gate = gate
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (key, status)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)  # (key, "prompt" | "completion")

    def observe(self, access: Access) -> None:
        """One finished request (``Proxy.on_complete``); those without a key cost one attribute read."""
        name = access.key_name
        if name is None:
            return
        self.requests[name, access.status] += 1
        if access.prompt_tokens:
            self.tokens[name, "prompt"] += access.prompt_tokens
        if access.completion_tokens:
            self.tokens[name, "completion"] += access.completion_tokens

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "llmbalancer_key_requests", "Requests finished, by client key (its name) and HTTP status.",
            labels=["key", "status"],
        )
        for (key, status), count in list(self.requests.items()):
            requests.add_metric([key, str(status)], float(count))
        yield requests
        tokens = CounterMetricFamily(
            "llmbalancer_key_tokens", "Tokens the backends reported, by client key and kind (prompt, completion).",
            labels=["key", "kind"],
        )
        for (key, kind), count in list(self.tokens.items()):
            tokens.add_metric([key, kind], float(count))
        yield tokens
        in_flight = GaugeMetricFamily(
            "llmbalancer_key_in_flight", "Requests in flight, by client key.", labels=["key"]
        )
        for key in self._gate.table.names():
            in_flight.add_metric([key], float(self._gate.limits.in_flight(key)))
        yield in_flight
