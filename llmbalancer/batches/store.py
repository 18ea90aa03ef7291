"""What is kept of files, batches and their lines, as awaitable operations on the database thread.

A line is ``pending`` until its result is committed: ``done`` (an answer for the output file) or
``failed`` (for the error file), with the batch's counters moved in the same transaction. A line is
recorded once (``record_line`` touches only a pending line), so after a crash the lines that were in
flight are simply pending again, and each ``custom_id`` ends up in exactly one place.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmbalancer.batches.database import Database
from llmbalancer.batches.records import ACTIVE, BatchRecord, FileRecord

PENDING = "pending"
DONE = "done"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a batch, as the runner sends it."""

    batch_id: str
    line: int  # 1-based, as in the input file
    custom_id: str
    request_id: str
    body: str
    attempts: int


@dataclass(frozen=True, slots=True)
class LineResult:
    state: str  # DONE or FAILED
    attempts: int
    status_code: int | None = None
    response: str | None = None  # the backend's body, as it came
    error: dict[str, str] | None = None  # when there was no answer to keep: {code, message}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def _rows(connection: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    cursor = connection.execute(sql, params)
    cursor.row_factory = sqlite3.Row
    return cursor.fetchall()


class BatchStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- files ----------------------------------------------------------------------------------

    async def add_file(self, record: FileRecord) -> None:
        await self.db.write(lambda c: c.execute(
            "INSERT INTO files (id, owner, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (record.id, record.owner, record.filename, record.purpose, record.bytes, record.created_at),
        ))

    async def get_file(self, file_id: str) -> FileRecord | None:
        rows = await self.db.read(lambda c: _rows(c, "SELECT * FROM files WHERE id = ?", (file_id,))) or []
        return FileRecord.of(rows[0]) if rows else None

    async def list_files(
        self, purpose: str | None, limit: int, after: str | None, newest_first: bool, owner: str | None = None
    ) -> tuple[list[FileRecord], bool]:
        def work(c: sqlite3.Connection) -> list[sqlite3.Row]:
            where, params = ["1 = 1"], []
            if owner is not None:
                where.append("owner = ?")
                params.append(owner)
            if purpose is not None:
                where.append("purpose = ?")
                params.append(purpose)
            if after is not None:
                where.append(f"seq {'<' if newest_first else '>'} (SELECT seq FROM files WHERE id = ?)")
                params.append(after)
            order = "DESC" if newest_first else "ASC"
            return _rows(c, f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?",
                         [*params, limit + 1])

        rows = await self.db.read(work) or []
        return [FileRecord.of(r) for r in rows[:limit]], len(rows) > limit

    async def delete_file(self, file_id: str) -> bool:
        return await self.db.write(lambda c: c.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0)

    async def file_ids(self) -> set[str]:
        rows = await self.db.read(lambda c: c.execute("SELECT id FROM files").fetchall()) or []
        return {row[0] for row in rows}

    # --- batches --------------------------------------------------------------------------------

    async def create_batch(self, values: dict[str, Any]) -> BatchRecord:
        def work(c: sqlite3.Connection) -> BatchRecord:
            columns = ", ".join(values)
            c.execute(f"INSERT INTO batches ({columns}) VALUES ({', '.join('?' * len(values))})",
                      [_column(v) for v in values.values()])
            return BatchRecord.of(_rows(c, "SELECT * FROM batches WHERE id = ?", (values["id"],))[0])

        return await self.db.write(work)

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        rows = await self.db.read(lambda c: _rows(c, "SELECT * FROM batches WHERE id = ?", (batch_id,))) or []
        return BatchRecord.of(rows[0]) if rows else None

    async def list_batches(
        self, limit: int, after: str | None, owner: str | None = None
    ) -> tuple[list[BatchRecord], bool]:
        def work(c: sqlite3.Connection) -> list[sqlite3.Row]:
            where, params = ["1 = 1"], []
            if owner is not None:
                where.append("owner = ?")
                params.append(owner)
            if after is not None:
                where.append("seq < (SELECT seq FROM batches WHERE id = ?)")
                params.append(after)
            return _rows(c, f"SELECT * FROM batches WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
                         [*params, limit + 1])

        rows = await self.db.read(work) or []
        return [BatchRecord.of(r) for r in rows[:limit]], len(rows) > limit

    async def active_batches(self) -> list[BatchRecord]:
        marks = ", ".join("?" * len(ACTIVE))
        rows = await self.db.read(
            lambda c: _rows(c, f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)
        ) or []
        return [BatchRecord.of(r) for r in rows]

    async def update_batch(self, batch_id: str, **values: Any) -> BatchRecord:
        return await self.db.write(lambda c: update_batch(c, batch_id, values))

    # --- lines ----------------------------------------------------------------------------------

    async def insert_lines(self, batch_id: str, lines: Iterable[tuple[int, str, str, str]]) -> None:
        """``(line, custom_id, request_id, body)`` rows of a batch being validated."""
        rows = [(batch_id, *row) for row in lines]
        await self.db.write(lambda c: c.executemany(
            "INSERT INTO lines (batch_id, line, custom_id, request_id, body) VALUES (?, ?, ?, ?, ?)", rows
        ))

    async def delete_lines(self, batch_id: str) -> None:
        await self.db.write(lambda c: c.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,)))

    async def pending_lines(self, batch_id: str, after_line: int, limit: int) -> list[Line]:
        rows = await self.db.read(lambda c: c.execute(
            "SELECT line, custom_id, request_id, body, attempts FROM lines "
            "WHERE batch_id = ? AND state = 'pending' AND line > ? ORDER BY line LIMIT ?",
            (batch_id, after_line, limit),
        ).fetchall()) or []
        return [Line(batch_id, *row) for row in rows]

    async def record_line(self, line: Line, result: LineResult) -> bool:
        """Commit one line's result and the batch's counters; False when it was recorded before."""

        def work(c: sqlite3.Connection) -> bool:
            changed = c.execute(
                "UPDATE lines SET state = ?, attempts = ?, status_code = ?, response = ?, error = ? "
                "WHERE batch_id = ? AND line = ? AND state = 'pending'",
                (result.state, result.attempts, result.status_code, result.response,
                 json.dumps(result.error) if result.error else None, line.batch_id, line.line),
            ).rowcount
            if not changed:
                return False
            counter = "completed" if result.state == DONE else "failed"
            c.execute(
                f"UPDATE batches SET {counter} = {counter} + 1, input_tokens = input_tokens + ?, "
                "output_tokens = output_tokens + ?, cached_tokens = cached_tokens + ? WHERE id = ?",
                (result.prompt_tokens, result.completion_tokens, result.cached_tokens, line.batch_id),
            )
            return True

        return await self.db.write(work)

    async def pending_count(self, batch_id: str) -> int:
        rows = await self.db.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM lines WHERE batch_id = ? AND state = 'pending'", (batch_id,)
        ).fetchall()) or [(0,)]
        return int(rows[0][0])

    async def count_attempt(self, line: Line, attempts: int) -> None:
        """A failed attempt, kept so that a restart does not grant a line more tries than it had left."""
        await self.db.write(lambda c: c.execute(
            "UPDATE lines SET attempts = ? WHERE batch_id = ? AND line = ? AND state = 'pending'",
            (attempts, line.batch_id, line.line),
        ))


def update_batch(c: sqlite3.Connection, batch_id: str, values: dict[str, Any]) -> BatchRecord:
    if values:
        assignments = ", ".join(f"{name} = ?" for name in values)
        c.execute(f"UPDATE batches SET {assignments} WHERE id = ?", [*map(_column, values.values()), batch_id])
    return BatchRecord.of(_rows(c, "SELECT * FROM batches WHERE id = ?", (batch_id,))[0])


def _column(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
