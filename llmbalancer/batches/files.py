"""Uploaded and produced files on disk: ``<batch.dir>/files/<file id>``, one file each.

An upload is written as it arrives, never held whole in memory: chunks are gathered up to ``_FLUSH``
bytes and written off the event loop, into ``<id>.part``, which becomes ``<id>`` (after an fsync) only
once complete and within the size limit. Files the database does not know (a ``.part`` left by a crash,
an output file written just before one) are swept at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import BinaryIO

_FLUSH = 1 << 20
PART = ".part"


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"over {limit} bytes")
        self.limit = limit


class FileSpace:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = Path(directory) / "files"
        self.max_bytes = max_bytes

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    async def receive(self, file_id: str, chunks: AsyncIterator[bytes]) -> int:
        """Write ``chunks`` as file ``file_id``; its size. ``TooLarge`` past ``max_bytes`` (nothing kept)."""
        part = self.directory / (file_id + PART)
        handle = await asyncio.to_thread(self._create, part)
        size = 0
        pending: list[bytes] = []
        pending_bytes = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise TooLarge(self.max_bytes)
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= _FLUSH:
                    await asyncio.to_thread(handle.write, b"".join(pending))
                    pending, pending_bytes = [], 0
            await asyncio.to_thread(_finish, handle, b"".join(pending), part, self.path(file_id))
        except BaseException:
            await asyncio.to_thread(_discard, handle, part)
            raise
        return size

    def _create(self, part: Path) -> BinaryIO:
        self.directory.mkdir(parents=True, exist_ok=True)
        return part.open("wb")

    async def remove(self, file_id: str) -> None:
        await asyncio.to_thread(_unlink, self.path(file_id))

    def sweep(self, known: Iterable[str]) -> list[str]:
        """Remove what no record names (blocking: start-up, off the loop); the names removed."""
        if not self.directory.is_dir():
            return []
        keep = set(known)
        removed = []
        for entry in self.directory.iterdir():
            if entry.name not in keep and entry.is_file():
                _unlink(entry)
                removed.append(entry.name)
        return removed


def _finish(handle: BinaryIO, last: bytes, part: Path, final: Path) -> None:
    with handle:
        handle.write(last)
        handle.flush()
        os.fsync(handle.fileno())
    part.replace(final)


def _discard(handle: BinaryIO, part: Path) -> None:
    handle.close()
    _unlink(part)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
