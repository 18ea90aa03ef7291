"""The Files and Batches API's operations, as the web routes call them: arguments checked the way
OpenAI checks them (a mistake is a ``ProxyError``, 400 or 404), answers in OpenAI's shapes.

``owner``: the client key's name when keys are configured (None otherwise: everything is everyone's). A
file or batch is kept with the key that made it and is visible only to that key: another key's is 404, as
one that does not exist."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from llmbalancer.batches.files import TooLarge
from llmbalancer.batches.records import (
    ACTIVE,
    ENDPOINTS,
    INPUT_PURPOSE,
    VALIDATING,
    FileRecord,
    list_page,
    new_id,
    priority_of,
)
from llmbalancer.batches.runner import BatchRunner
from llmbalancer.errors import ProxyError

MAX_METADATA_KEYS = 16
MAX_FILENAME = 255


def invalid(message: str, code: str = "invalid_request") -> ProxyError:
    return ProxyError(400, message, "invalid_request_error", code)


def not_found(kind: str, item_id: str) -> ProxyError:
    return ProxyError(404, f"No {kind} with id {item_id[:100]!r}", "invalid_request_error", "not_found")


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, f"The file exceeds the limit of {limit} bytes (batch.max_file_bytes)", "invalid_request_error",
        "file_too_large",
    )


class BatchApi:
    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner
        self.store = runner.store
        self.files = runner.files
        self.config = runner.config

    # --- files ----------------------------------------------------------------------------------

    @staticmethod
    def check_purpose(purpose: str | None) -> None:
        if purpose != INPUT_PURPOSE:
            raise invalid(f"purpose must be {INPUT_PURPOSE!r} (the only one served here), got {purpose!r}",
                          "invalid_purpose")

    async def receive(self, file_id: str, chunks: AsyncIterator[bytes]) -> int:
        """Stream an upload to disk as ``file_id``; its size (413 past ``batch.max_file_bytes``)."""
        try:
            return await self.files.receive(file_id, chunks)
        except TooLarge as exc:
            raise too_large(exc.limit) from None

    async def register(
        self, file_id: str, filename: str, size: int, purpose: str | None, owner: str | None = None
    ) -> dict[str, Any]:
        """Record a received upload (its ``purpose`` may have come after it in the form)."""
        self.check_purpose(purpose)
        assert purpose is not None
        record = FileRecord(file_id, owner, _clean_name(filename), purpose, size, int(time.time()))
        await self.store.add_file(record)
        return record.openai()

    async def discard(self, file_id: str) -> None:
        await self.store.delete_file(file_id)
        await self.files.remove(file_id)

    async def file(self, file_id: str, owner: str | None = None) -> FileRecord:
        record = await self.store.get_file(file_id)
        if record is None or not _visible(record.owner, owner):
            raise not_found("file", file_id)
        return record

    async def content(self, file_id: str, owner: str | None = None) -> Path:
        await self.file(file_id, owner)
        return self.files.path(file_id)

    async def list_files(self, query: Mapping[str, str], owner: str | None = None) -> dict[str, Any]:
        limit = _limit(query, default=10_000, most=10_000)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid(f"order must be 'asc' or 'desc', got {order[:20]!r}")
        records, more = await self.store.list_files(
            query.get("purpose"), limit, query.get("after"), order == "desc", owner
        )
        return list_page([r.openai() for r in records], more)

    async def delete_file(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        await self.file(file_id, owner)
        await self.store.delete_file(file_id)
        await self.files.remove(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches --------------------------------------------------------------------------------

    async def create(self, body: Mapping[str, Any], owner: str | None = None) -> dict[str, Any]:
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise invalid("input_file_id is required (the id of a file uploaded with purpose 'batch')")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise invalid(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {str(endpoint)[:100]!r}",
                          "invalid_endpoint")
        window = body.get("completion_window")
        windows = self.config.completion_windows
        if not isinstance(window, str) or window not in windows:
            raise invalid(f"completion_window must be one of {', '.join(map(repr, windows))}, got "
                          f"{str(window)[:100]!r}", "invalid_completion_window")
        metadata = _metadata(body.get("metadata"))
        record = await self.store.get_file(input_file_id)
        if record is None or record.purpose != INPUT_PURPOSE or not _visible(record.owner, owner):
            raise invalid(f"input_file_id {input_file_id[:100]!r} is not a file uploaded with purpose 'batch'",
                          "invalid_input_file")
        now = int(time.time())
        created = await self.store.create_batch({
            "id": new_id("batch_"), "owner": owner, "status": VALIDATING, "endpoint": endpoint,
            "input_file_id": input_file_id, "completion_window": window, "window_s": windows[window],
            "priority": priority_of(metadata), "metadata": metadata, "created_at": now,
            "expires_at": now + round(windows[window]),
        })
        self.runner.adopt(created)
        return created.openai()

    async def batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        record = await self.store.get_batch(batch_id)
        if record is None or not _visible(record.owner, owner):
            raise not_found("batch", batch_id)
        active = self.runner.active.get(batch_id)
        if active is not None:  # the counters as they are this moment (committed, never ahead of the store)
            record.completed, record.failed = active.completed, active.failed
        return record.openai()

    async def list_batches(self, query: Mapping[str, str], owner: str | None = None) -> dict[str, Any]:
        records, more = await self.store.list_batches(_limit(query, default=20, most=100), query.get("after"), owner)
        return list_page([r.openai() for r in records], more)

    async def cancel(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        record = await self.store.get_batch(batch_id)
        if record is None or not _visible(record.owner, owner):
            raise not_found("batch", batch_id)
        if record.status not in ACTIVE:
            raise invalid(f"Cannot cancel a batch with status {record.status!r}", "invalid_batch_status")
        cancelled = await self.runner.cancel(batch_id)
        return (cancelled or record).openai()


def _visible(owner: str | None, asking: str | None) -> bool:
    """Whether a record kept with ``owner`` is shown to ``asking`` (None: keys are not configured)."""
    return asking is None or owner == asking


def _limit(query: Mapping[str, str], default: int, most: int) -> int:
    value = query.get("limit")
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        raise invalid(f"limit must be a whole number from 1 to {most}, got {value[:20]!r}") from None
    if not 1 <= limit <= most:
        raise invalid(f"limit must be from 1 to {most}, got {limit}")
    return limit


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise invalid(f"metadata must be an object of at most {MAX_METADATA_KEYS} string values", "invalid_metadata")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise invalid("metadata keys are at most 64 characters and values strings of at most 512",
                          "invalid_metadata")
    return dict(value)


def _clean_name(filename: str) -> str:
    name = "".join(ch if ch.isprintable() else "?" for ch in filename.replace("\\", "/").rsplit("/", 1)[-1])
    return name[:MAX_FILENAME] or "upload.jsonl"
