"""Server-sent events read incrementally: bytes in as they arrive, each complete event's data out.

Lines end with LF or CRLF; an event ends at a blank line; its ``data:`` lines are joined with LF; other
fields (``event:``, ``id:``, comments) are dropped, as the translation needs only the data. An event that
never ends is bounded: past ``max_event`` bytes the stream is not SSE as this reader understands it.
"""

from __future__ import annotations

MAX_EVENT = 16 * 1024 * 1024  # a tool call's arguments or a long reasoning delta, never more


class SseOverflow(Exception):
    """An event longer than the reader's bound."""


class SseReader:
    __slots__ = ("_buffer", "_data", "_max")

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._max = max_event

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that ``chunk`` completes, in order."""
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        self._buffer = buffer[start:]
        if len(self._buffer) + sum(len(d) for d in self._data) > self._max:
            raise SseOverflow(f"an event of more than {self._max} bytes")
        return events

    def finish(self) -> list[bytes]:
        """At the end of the stream: an event its last blank line did not end (or a last unterminated line)."""
        if self._buffer.startswith(b"data:"):
            value = self._buffer[5:].rstrip(b"\r")
            self._data.append(value[1:] if value.startswith(b" ") else value)
        self._buffer = b""
        events = [b"\n".join(self._data)] if self._data else []
        self._data = []
        return events
