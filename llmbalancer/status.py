"""``llmbalancer status``: read a running balancer's snapshot and print it as a compact table."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

# SERVER-QUEUE: requests waiting inside the backend (llama.cpp's deferred); the summary's "balancer queue" is
# this balancer's admission queue, requests no backend had a slot for yet.
COLUMNS = (
    "BACKEND", "STATE", "SLOTS", "IN-FLIGHT", "SERVER-QUEUE", "TTFT", "LATENCY", "REQUESTS", "ERRORS", "LAST ERROR"
)
_MAX_ERROR = 60


class StatusError(Exception):
    pass


def fetch_snapshot(url: str, timeout: float = 5.0, token: str | None = None) -> dict[str, Any]:
    """The snapshot; ``token``: the admin token or an observe key (needed when the balancer has client keys)."""
    target = url.rstrip("/") + "/llmhealth-snapshot"
    request = urllib.request.Request(target, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return dict(json.load(reply))
    except urllib.error.HTTPError as exc:
        hint = " (the balancer has client keys: give --token, the admin token or a key with observe: true)" \
            if exc.code in (401, 403) else ""
        raise StatusError(f"cannot read {target}: HTTP {exc.code} {exc.reason}{hint}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatusError(f"cannot read {target}: {getattr(exc, 'reason', exc)}") from exc


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _text(value: object) -> str:
    if value is None:
        return "-"
    # Names and errors come from config and backends: keep control characters off the terminal.
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))


def _deferred(backend: dict[str, Any]) -> object:
    """Requests waiting inside the backend: ``deferred``, or ``queue_depth`` from snapshots that predate it."""
    deferred = backend.get("deferred")
    return deferred if deferred is not None else backend.get("queue_depth")


def format_table(snapshot: dict[str, Any]) -> str:
    rows = [COLUMNS]
    for b in snapshot.get("backends", []):
        total = b.get("slots_total") if b.get("slots_total") is not None else b.get("max_concurrency")
        busy = b.get("slots_busy") if b.get("slots_busy") is not None else b.get("in_flight")
        error = _text(b.get("last_error"))
        rows.append((
            _text(b.get("name")), _text(b.get("state")), f"{busy}/{'?' if total is None else total}",
            _text(b.get("in_flight")), _text(_deferred(b)), _seconds(b.get("ttft_avg_s")),
            _seconds(b.get("latency_avg_s")), _text(b.get("requests_total")), _text(b.get("errors_total")),
            error if len(error) <= _MAX_ERROR else error[: _MAX_ERROR - 3] + "...",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    queue = snapshot.get("queue") or {}
    gpu = snapshot.get("gpu") or {}
    up = sum(1 for b in snapshot.get("backends", []) if b.get("routable"))
    summary = (
        f"{up}/{len(snapshot.get('backends', []))} backends up  policy {_text(snapshot.get('policy'))}  "
        f"balancer queue {_text(queue.get('depth'))}/{_text(queue.get('capacity'))}  "
        f"gpu {_text(gpu.get('status'))} {gpu.get('max_utilization_pct', 0):.0f}%"
        + ("" if gpu.get("nvml_available") else " (NVML unavailable)")
    )
    return "\n".join([summary, *lines, *_batch_lines(snapshot.get("batches"))])


BATCH_COLUMNS = ("BATCH", "STATUS", "DONE", "FAILED", "TOTAL", "RUNNING", "RATE", "FINISHES IN")


def _batch_lines(batches: dict[str, Any] | None) -> list[str]:
    """The active batches under the backends, with the slots their lines hold; nothing when there are none."""
    active = (batches or {}).get("active") or []
    if not active:
        return []
    rows = [BATCH_COLUMNS]
    for b in active:
        rate = b.get("rate_per_s")
        rows.append((
            _text(b.get("id")), _text(b.get("status")), _text(b.get("completed")), _text(b.get("failed")),
            _text(b.get("total")), _text(b.get("in_flight")), "-" if rate is None else f"{rate:.1f}/s",
            _eta(b.get("eta_s")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(BATCH_COLUMNS))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    held = (batches or {}).get("slots_held")
    return ["", f"{len(active)} active batch(es)  batch work holds {_text(held)} slot(s)", *table]


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}min" if seconds < 5400 else f"{seconds / 3600:.1f}h"
