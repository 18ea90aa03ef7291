"""The batch runner's figures for ``/metrics``, read at scrape time: lines by outcome, the slots batch work
holds (in all and per backend), active batches by status, and lines left to run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmbalancer.batches import BatchRunner

OUTCOMES = ("completed", "failed", "retried", "expired", "cancelled")
STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


class BatchCollector(Collector):
    def __init__(self, runner: BatchRunner) -> None:
        self._runner = runner

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        runner = self._runner
        lines = CounterMetricFamily(
            "llmbalancer_batch_lines",
            "Batch lines by outcome since start: completed (2xx, in the output file), failed (in the error file), "
            "retried (sent again after a backend failed), expired and cancelled (never run).",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            lines.add_metric([outcome], float(runner.outcomes[outcome]))
        yield lines
        yield GaugeMetricFamily(
            "llmbalancer_batch_slots_held", "Slots batch lines hold now, all backends.", value=runner.gate.total
        )
        by_backend = GaugeMetricFamily(
            "llmbalancer_backend_batch_in_flight", "Batch lines in flight on the backend.", labels=["backend"]
        )
        for name, held in sorted(runner.gate.held.items()):
            by_backend.add_metric([name], float(held))
        yield by_backend
        active = runner.describe()
        statuses = Counter(batch["status"] for batch in active)
        batches = GaugeMetricFamily("llmbalancer_batches", "Active batches by status.", labels=["status"])
        for status in STATUSES:
            batches.add_metric([status], float(statuses[status]))
        yield batches
        yield GaugeMetricFamily(
            "llmbalancer_batch_lines_left", "Lines of active batches not finished yet.",
            value=sum(max(0, b["total"] - b["completed"] - b["failed"]) for b in active),
        )
