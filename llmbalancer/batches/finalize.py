"""Ending a batch: its output and error files written from the committed lines, in one database job.

The output file holds every line that was answered 2xx, the error file every other line (answered with
an error, out of attempts, or never run: ``batch_expired``, ``batch_cancelled``), each line once, in the
input's order, in OpenAI's form ``{id, custom_id, response: {status_code, request_id, body}, error}``.
Each file is written and fsynced before the transaction that names it commits; a crash in between leaves
a file no record names, swept at the next start, and the batch still active, ended again.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any

from llmbalancer.batches.files import PART, FileSpace
from llmbalancer.batches.records import OUTPUT_PURPOSE, BatchRecord, new_id
from llmbalancer.batches.store import update_batch

UNRUN = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}


def finalize(c: sqlite3.Connection, files: FileSpace, batch_id: str, status: str) -> tuple[BatchRecord, int]:
    """End ``batch_id`` as ``status`` (completed, expired or cancelled); lines not run go to the error file.
    The batch as it ends, and how many lines it ended without running."""
    now = int(time.time())
    unrun = UNRUN.get(status)
    not_run = 0
    if unrun is not None:
        code, message = unrun
        not_run = c.execute(
            "UPDATE lines SET state = 'failed', error = ? WHERE batch_id = ? AND state = 'pending'",
            (json.dumps({"code": code, "message": message}), batch_id),
        ).rowcount
    output = _write(c, files, batch_id, "done", f"{batch_id}_output.jsonl", now)
    errors = _write(c, files, batch_id, "failed", f"{batch_id}_error.jsonl", now)
    completed, failed = c.execute(
        "SELECT COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'failed'), 0) FROM lines WHERE batch_id = ?",
        (batch_id,),
    ).fetchone()
    return update_batch(c, batch_id, {
        "status": status, f"{status}_at": now, "output_file_id": output, "error_file_id": errors,
        "completed": completed, "failed": failed,
    }), not_run


def _write(c: sqlite3.Connection, files: FileSpace, batch_id: str, state: str, filename: str, now: int) -> str | None:
    rows = c.execute(
        "SELECT custom_id, request_id, status_code, response, error FROM lines "
        "WHERE batch_id = ? AND state = ? ORDER BY line", (batch_id, state),
    )
    file_id = new_id("file-")
    files.directory.mkdir(parents=True, exist_ok=True)
    part = files.directory / (file_id + PART)
    size = 0
    with part.open("wb") as handle:
        for custom_id, request_id, status_code, response, error in rows:
            line = json.dumps(_line(custom_id, request_id, status_code, response, error), ensure_ascii=False)
            data = line.encode() + b"\n"
            handle.write(data)
            size += len(data)
        handle.flush()
        os.fsync(handle.fileno())
    if size == 0:
        part.unlink()
        return None
    part.replace(files.path(file_id))
    c.execute(
        "INSERT INTO files (id, owner, filename, purpose, bytes, created_at) "
        "SELECT ?, owner, ?, ?, ?, ? FROM batches WHERE id = ?",
        (file_id, filename, OUTPUT_PURPOSE, size, now, batch_id),
    )
    return file_id


def _line(custom_id: str, request_id: str, status_code: int | None, response: str | None,
          error: str | None) -> dict[str, Any]:
    answer = None
    if status_code is not None:
        answer = {"status_code": status_code, "request_id": request_id, "body": _body(response)}
    return {
        "id": request_id,
        "custom_id": custom_id,
        "response": answer,
        "error": json.loads(error) if error else None,
    }


def _body(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON (a proxy's HTML error page): kept as the string it was
