"""What a client sends is observed in bounded form: metric labels only for models the fleet knows, and long
model names, paths and errors cut short in the recent-requests ring and the access log."""

from __future__ import annotations

import time

from structlog.testing import capture_logs

from llmbalancer.config import ModelRoute, RoutingConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.observe.metrics import MAX_ROUTED_LABELS, Metrics
from llmbalancer.observe.recent import RecentRequests
from llmbalancer.relay.access import MAX_TEXT, Access, clip
from llmbalancer.scheduling.model_routing import ModelRouter

MIB = 1024 * 1024


def _backend(name: str, models: tuple[str, ...] = (), served: tuple[str, ...] = ()) -> Backend:
    made = Backend(name=name, url=f"http://{name}", models=models, state=BackendState.HEALTHY)
    made.health.served_models, made.health.slots_total = served, 2
    return made


def _access(model: str | None, status: int = 200, path: str = "/v1/chat/completions") -> Access:
    access = Access("id", "POST", path, time.monotonic(), model=model, backend="a", status=status)
    access.finished = access.started
    return access


def test_metrics_label_only_models_a_backend_serves_or_a_route_names() -> None:
    registry = Registry()
    registry.add(_backend("a", models=("qwen2.5-7b",), served=("llama3:latest",)))
    registry.add(_backend("b", served=("qwen2.5-7b-2",)))
    router = ModelRouter(RoutingConfig(models=(ModelRoute(pattern="team-.*"),)))
    metrics = Metrics(registry, router)
    for model in ("qwen2.5-7b", "qwen2.5-7b-2", "llama3", "llama3:latest", "team-x", "made-up", "z" * MIB, None):
        metrics.observe(_access(model))
    labels = {model for _, model, _ in metrics.requests}
    assert labels == {"qwen2.5-7b", "qwen2.5-7b-2", "llama3", "llama3:latest", "team-x", "other", ""}
    assert metrics.requests["a", "other", 200] == 2

    # A route may name endless models: only the first ones get a label of their own.
    for index in range(2 * MAX_ROUTED_LABELS):
        metrics.observe(_access(f"team-{index}"))
    assert len({model for _, model, _ in metrics.requests if model.startswith("team-")}) == MAX_ROUTED_LABELS
    assert len(metrics.exposition()) < 64 * 1024


def test_metrics_known_models_follow_the_backends_model_lists() -> None:
    registry = Registry()
    a = registry.add(_backend("a", served=("old",)))
    metrics = Metrics(registry)
    assert metrics.model_label("new") == "other"
    assert metrics.model_label("old") == "old"
    a.health.served_models = ("new",)  # as the poller does: a new tuple, and says so
    registry.models_changed()
    assert metrics.model_label("new") == "new"
    assert metrics.model_label("old") == "other"


def test_recent_requests_keep_long_model_path_and_error_cut_short() -> None:
    recent = RecentRequests(5)
    access = _access("m" * MIB, status=404, path="/v1/" + "p" * 5000)
    access.error = "e" * 10_000
    recent.observe(access)
    [kept] = recent.newest_first()
    assert kept.model is not None and kept.error is not None
    assert len(kept.model) <= MAX_TEXT and len(kept.path) <= MAX_TEXT and len(kept.error) <= MAX_TEXT
    assert kept.model.startswith("mmm") and kept.model.endswith(f"({MIB} chars)")
    assert access.model == "m" * MIB  # the other observers' record is left alone
    short = _access("smollm2")
    recent.observe(short)
    assert recent.newest_first()[0].model == "smollm2"


def test_the_access_log_cuts_a_huge_model_name() -> None:
    access = _access("m" * MIB, status=404)
    with capture_logs() as logs:
        access.emit()
    [event] = logs
    assert event["event"] == "request"
    assert len(event["model"]) <= MAX_TEXT
    assert clip("smollm2") == "smollm2" and clip(None) is None
