"""Files and batches as stored, and as OpenAI's API shows them (``openai.types.FileObject``, ``Batch``).

``owner`` is stored with each (empty for now): the keys issue scopes files and batches to the key that
made them by filtering on it.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

VALIDATING = "validating"
FAILED = "failed"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
# Still the runner's business: after a restart each of these is taken up again.
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
INPUT_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"


def new_id(prefix: str) -> str:
    """``file-…``, ``batch_…``, ``batch_req_…``: OpenAI's prefixes, 24 random hex digits."""
    return prefix + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    owner: str | None
    filename: str
    purpose: str
    bytes: int
    created_at: int

    @classmethod
    def of(cls, row: sqlite3.Row) -> FileRecord:
        return cls(row["id"], row["owner"], row["filename"], row["purpose"], row["bytes"], row["created_at"])

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


_TIMES = (
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at",
)


@dataclass(slots=True)
class BatchRecord:
    seq: int
    id: str
    owner: str | None
    status: str
    endpoint: str
    input_file_id: str
    completion_window: str
    window_s: float
    priority: int
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    model: str | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    times: dict[str, int | None]

    @classmethod
    def of(cls, row: sqlite3.Row) -> BatchRecord:
        return cls(
            row["seq"], row["id"], row["owner"], row["status"], row["endpoint"], row["input_file_id"],
            row["completion_window"], row["window_s"], row["priority"],
            json.loads(row["metadata"]) if row["metadata"] else None,
            json.loads(row["errors"]) if row["errors"] else None,
            row["model"], row["output_file_id"], row["error_file_id"],
            row["total"], row["completed"], row["failed"],
            row["input_tokens"], row["output_tokens"], row["cached_tokens"],
            {name: row[name] for name in _TIMES},
        )

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            **self.times,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            "metadata": self.metadata,
        }


def priority_of(metadata: dict[str, str] | None) -> int:
    """``metadata.priority`` (a string, as all metadata values are): higher runs first; absent or not a
    whole number: 0."""
    value = (metadata or {}).get("priority")
    try:
        return max(-1000, min(1000, int(str(value).strip()))) if value is not None else 0
    except ValueError:
        return 0


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: ``after`` is the last id of one page, for the next."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
