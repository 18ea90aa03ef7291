"""The one SQLite connection, on one thread of its own: every statement runs there, never on the event loop.

Jobs are functions of the connection, queued from the loop and awaited there. The thread takes whatever
has queued up and runs it as one transaction (group commit: one fsync for many line results), each job
inside a savepoint of its own so that one job's exception undoes that job only; every job's future is
resolved after the commit, so a result the loop sees is on disk. A job whose awaiting task was cancelled
before the thread took it is skipped.

The file is created at the first write (``write``); until then reads (``read``) answer their default, so a
balancer nobody sends a batch to leaves nothing on disk. ``open`` is the start-up check: a ``dir`` that
cannot hold the database, or a database file SQLite finds corrupt, is a ``ConfigError`` naming ``batch.dir``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from llmbalancer.config import ConfigError, Problem

T = TypeVar("T")
DB_NAME = "batches.sqlite3"
_MAX_GROUP = 256  # jobs per transaction at most: a long queue still commits now and then

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    window_s REAL NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,
    errors TEXT,
    model TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER, expires_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,
    response TEXT,
    error TEXT,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_pending ON lines (batch_id, state, line);
"""


@dataclass(eq=False)
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    create: bool = True


class Database:
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    @property
    def exists(self) -> bool:
        return self.path.exists()

    async def open(self) -> None:
        """Start-up: check that ``directory`` can hold the database and that an existing one is sound."""
        problem = _unusable_directory(self.directory)
        if problem is None and self.exists:
            try:
                await self.read(lambda c: None)
            except sqlite3.Error as exc:
                problem = f"{self.path} is not a usable SQLite database ({exc})"
            except OSError as exc:
                problem = f"{self.path} cannot be opened ({exc.strerror or exc})"
        if problem is not None:
            await self.close()
            raise ConfigError([Problem("batch.dir", problem)])

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T | None:
        """``work(connection)`` on the database thread; None while there is no database yet."""
        if not self.exists and self._connection is None:
            return None
        result = await self._submit(_Job(work, create=False))
        return None if result is _ABSENT else result

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(connection)`` on the database thread, committed before this returns (creates the file)."""
        result: T = await self._submit(_Job(work))
        return result

    async def _submit(self, job: _Job) -> Any:
        self._start()
        self._jobs.put(job)
        return await asyncio.wrap_future(job.future)

    async def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="llmbalancer-batch-db", daemon=True)
                self._thread.start()

    # --- the database thread -------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                group = [job]
                while len(group) < _MAX_GROUP:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._jobs.put(None)  # after this group
                        break
                    group.append(more)
                self._run_group([j for j in group if j.future.set_running_or_notify_cancel()])
        finally:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _run_group(self, group: list[_Job]) -> None:
        try:
            connection = self._connect(create=any(j.create for j in group))
        except (sqlite3.Error, OSError) as exc:
            for job in group:
                job.future.set_exception(exc)
            return
        if connection is None:
            for job in group:
                job.future.set_result(_ABSENT)
            return
        results: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for job in group:
                connection.execute("SAVEPOINT job")
                try:
                    results.append((job, job.work(connection), None))
                except Exception as exc:
                    connection.execute("ROLLBACK TO job")
                    results.append((job, None, exc))
                connection.execute("RELEASE job")
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for job, result, error in results:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._connection is not None:
            return self._connection
        if not create and not self.path.exists():
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if connection.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.DatabaseError("the file system does not support SQLite's WAL mode")
            # FULL: a committed line result survives a power cut too, not only a killed process; group
            # commits keep that to one fsync per group of results.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA busy_timeout=5000")
            check = connection.execute("PRAGMA quick_check(1)").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            connection.executescript(SCHEMA)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection


_ABSENT = object()


def _unusable_directory(directory: Path) -> str | None:
    """Why ``directory`` cannot hold the database (now, or once created), or None."""
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory" if existing == directory else \
            f"cannot create {directory}: {existing} is not a directory"
    probe = existing / f".llmbalancer-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        what = directory if existing == directory else f"{existing} (to create {directory} in)"
        return f"{what} is not writable ({exc.strerror or exc})"
    return None
