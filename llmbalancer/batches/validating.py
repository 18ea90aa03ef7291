"""A new batch's first step: its input file checked (``validation.py``, in a thread), then its lines
stored, a chunk per transaction. A batch whose file fails the check ends ``failed`` with its errors by
line; otherwise it is ``in_progress``. Interrupted (a crash), it is validated again from the start."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from llmbalancer.batches.files import FileSpace
from llmbalancer.batches.records import FAILED, IN_PROGRESS, BatchRecord
from llmbalancer.batches.store import BatchStore
from llmbalancer.batches.validation import Checked, check_file, read_lines

log = structlog.get_logger("llmbalancer.batches")


async def validate(store: BatchStore, files: FileSpace, record: BatchRecord, max_lines: int) -> BatchRecord | None:
    """The batch, now ``in_progress`` with its lines stored; None when it failed validation."""
    try:
        checked = await _store_lines(store, files, record, max_lines)
    except FileNotFoundError:
        errors = [_error("invalid_file", f"The input file {record.input_file_id} was deleted", "input_file_id")]
    except (OSError, ValueError) as exc:  # the disk, or a file that changed under us: not the client's mistake
        errors = [_error("validation_error", f"The input file could not be read: {exc}")]
    else:
        if not checked.errors:
            return await store.update_batch(
                record.id, status=IN_PROGRESS, in_progress_at=int(time.time()), total=checked.lines,
                model=checked.model,
            )
        errors = checked.errors
        log.info("batch_invalid", batch=record.id, errors=len(errors), first=errors[0]["message"])
    await store.update_batch(record.id, status=FAILED, failed_at=int(time.time()), errors=errors)
    return None


async def _store_lines(store: BatchStore, files: FileSpace, record: BatchRecord, max_lines: int) -> Checked:
    path = files.path(record.input_file_id)
    checked = await asyncio.to_thread(check_file, path, record.endpoint, max_lines)
    if checked.errors:
        return checked
    await store.delete_lines(record.id)  # what an interrupted validation stored
    chunks = read_lines(path)
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            await store.insert_lines(record.id, chunk)
    finally:
        await asyncio.to_thread(chunks.close)
    return checked


def _error(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": None}
