"""Streaming load: keep-alive connections that each run SSE chat streams back to back for a fixed time.

Raw asyncio streams (no HTTP library) so the client costs little per chunk; it counts SSE events
(``data:`` lines), not TCP reads, and times each stream's first event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

_BODY = b'{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"stream":true,"max_tokens":100}'


@dataclass
class StreamStats:
    events: int = 0
    streams: int = 0
    errors: int = 0
    elapsed: float = 0.0
    first_event: list[float] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed if self.elapsed else 0.0


def _request(host: str, port: int, path: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(_BODY)}\r\n\r\n"
    ).encode() + _BODY


class _Counter:
    """Counts ``data:`` across reads, including one split over two reads."""

    def __init__(self) -> None:
        self.count = 0
        self._tail = b""

    def feed(self, data: bytes) -> None:
        self.count += (self._tail + data).count(b"data:")
        self._tail = data[-4:]


async def _one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, stats: StreamStats
) -> bool:
    """Run one stream; return whether the connection can be reused."""
    started = time.perf_counter()
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    if not head.startswith((b"http/1.1 200", b"http/1.0 200")):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    counter = _Counter()
    first = True

    def got(data: bytes) -> None:
        nonlocal first
        if first and data:
            stats.first_event.append(time.perf_counter() - started)
            first = False
        counter.feed(data)

    if b"transfer-encoding: chunked" in head:
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            got((await reader.readexactly(size + 2))[:-2])
        reusable = b"connection: close" not in head
    elif b"content-length:" in head:
        length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while length:
            data = await reader.read(min(length, 65536))
            if not data:
                raise ConnectionError("body cut short")
            length -= len(data)
            got(data)
        reusable = b"connection: close" not in head
    else:
        while data := await reader.read(65536):
            got(data)
        reusable = False
    stats.events += counter.count
    stats.streams += 1
    return reusable


async def _worker(host: str, port: int, path: str, deadline: float, stats: StreamStats) -> None:
    request = _request(host, port, path)
    while time.perf_counter() < deadline:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(host, port)
            while time.perf_counter() < deadline:
                if not await _one_stream(reader, writer, request, stats):
                    break
        except (OSError, asyncio.IncompleteReadError, ValueError):
            stats.errors += 1
            await asyncio.sleep(0.01)
        finally:
            if writer is not None:
                writer.close()


async def run_streams(host: str, port: int, path: str, concurrency: int, duration: float) -> StreamStats:
    """Run ``concurrency`` connections streaming for ``duration`` seconds (a stream under way finishes)."""
    stats = StreamStats()
    started = time.perf_counter()
    workers = [_worker(host, port, path, started + duration, stats) for _ in range(concurrency)]
    async with asyncio.timeout(duration + 30):
        await asyncio.gather(*workers)
    stats.elapsed = time.perf_counter() - started
    return stats
