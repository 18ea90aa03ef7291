"""One supervised instance's stdout and stderr: a size-rotated file, plus its last lines kept in memory."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import BinaryIO

_TAIL_BYTES = 8192


class OutputLog:
    """``<name>.log``, rotated to ``<name>.log.1`` .. ``.N`` when it would pass ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._tail = bytearray()
        self._file: BinaryIO | None = None
        self._size = 0

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        return self._file

    def mark(self, text: str) -> None:
        """A line of the balancer's own, marking a (re)start or an exit among the server's output."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write(f"\n===== llmbalancer {stamp}: {text} =====\n".encode())

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self._max_bytes and self._size:
            self._rotate()
        file = self._open()
        file.write(data)
        file.flush()  # the file is for people reading it live (tail -f)
        self._size += len(data)
        self._tail += data
        if len(self._tail) > _TAIL_BYTES:
            del self._tail[: len(self._tail) - _TAIL_BYTES]

    def tail(self, lines: int = 20) -> list[str]:
        text = self._tail.decode(errors="replace")
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def _rotate(self) -> None:
        self.close()
        if self._backups:
            for index in range(self._backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._size = 0
