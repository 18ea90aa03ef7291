"""The lean relay (relay/front.py, lean.py, upstream.py, stream.py) on real sockets: a client that stops
reading among a thousand streams is held back alone, bodies pass with the backend's own framing, backend
connections are kept alive, connections that ask for anything else are handed to aiohttp between
requests, pipelined requests are answered in order, and the usage cut works however the usage event is
split."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from llmbalancer.fleet.backend import BackendState
from tests.support import make_config, run_balancer, wait_for

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()
PLAIN = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).encode()
REPLY = b'{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}'
SLOW_EVENTS = 6000  # of 16 KiB: 96 MiB, several times what the sockets' buffers hold on the way (~25 MiB)
Handler = Callable[[bytes, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def _post(body: bytes, *, path: str = "/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (path.encode(), extra, len(body), body)
    )


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class RawBackend:
    """A backend answering by hand: ``GET /health`` as ``health`` says (llama.cpp's JSON, or vLLM's empty
    200, which makes it a plain OpenAI server), anything else by ``handler``; it counts connections."""

    def __init__(self, handler: Handler, health: bytes = b'{"status":"ok"}') -> None:
        self.handler = handler
        self.health = health
        self.connections = 0
        self.url = ""
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                lengths = [int(line[15:]) for line in lines if line.startswith(b"content-length:")]
                body = await reader.readexactly(lengths[0] if lengths else 0)
                if head.startswith(b"GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.health), self.health))
                elif head.startswith(b"GET /v1/models"):
                    models = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(models), models))
                elif head.startswith(b"GET "):  # /slots, /metrics, /props: not this server's
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                elif not await self.handler(head, body, reader, writer):
                    break
                await writer.drain()
        writer.close()
        self._tasks.discard(task)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RawBackend]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader, *, head_read: bool = False) -> tuple[bytes, bytes]:
    """A response's head and its chunked body, raw (framing included)."""
    head = b"" if head_read else await reader.readuntil(b"\r\n\r\n")
    raw = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                raw += line
            return head, raw + line
        raw += await reader.readexactly(size + 2)


def _in_pieces(framed: bytes, size: int) -> Handler:
    """A handler answering a chunked event stream whose raw body is ``framed``, ``size`` bytes a read."""

    async def answer(head: bytes, request: bytes, reader: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for at in range(0, len(framed), size):  # each piece a read of its own
            writer.write(framed[at : at + size])
            await writer.drain()
            await asyncio.sleep(0.002)
        return True

    return answer


async def _one_stream(port: int) -> tuple[bytes, bytes]:
    """A streamed chat request on a fresh connection: the response's head and raw chunked body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_post(CHAT))
        return await asyncio.wait_for(_read_chunked(reader), 5)
    finally:
        writer.close()


async def test_a_chunked_body_passes_with_the_backends_own_framing_byte_for_byte() -> None:
    # Two events in one chunk, one event over two chunks, a chunk extension, a trailer: relayed as they came.
    two, first, rest = b'data: {"a":1}\n\ndata: {"b":2}\n\n', b'data: {"c', b'":3}\n'
    body = (
        b"%x\r\n%s\r\n" % (len(two), two)
        + b"%x;note=split\r\n%s\r\n" % (len(first), first)
        + b"%X\r\n%s\r\n" % (len(rest), rest)
        + b"1\r\n\n\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )

    async with (
        RawBackend(_in_pieces(body, 7)).running() as backend,
        run_balancer(make_config([backend.url])) as balancer,
    ):
        head, raw = await _one_stream(balancer.port)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert raw == body


async def test_backend_connections_are_kept_alive_and_one_the_backend_closed_is_not_held_against_it() -> None:
    async def answer(head: bytes, request: bytes, reader: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(REPLY), REPLY))
        return b"x-close-after: 1" not in head.lower()

    async with RawBackend(answer).running() as backend, run_balancer(make_config([backend.url])) as balancer:
        await wait_for(lambda: all(b.routable for b in balancer.components.registry))
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            probes = backend.connections
            for _ in range(5):
                writer.write(_post(PLAIN))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                await reader.readexactly(len(REPLY))
            assert backend.connections - probes == 1  # five requests, one connection to the backend
            writer.write(_post(PLAIN, extra=b"X-Close-After: 1\r\n"))  # the backend closes it after answering
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            await reader.readexactly(len(REPLY))
            await asyncio.sleep(0.05)
            writer.write(_post(PLAIN))
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        finally:
            writer.close()
        (b,) = balancer.components.registry
        assert b.traffic.errors_total == 0 and b.state is BackendState.HEALTHY


async def test_a_body_running_until_the_backend_closes_reaches_the_client_chunked_and_whole() -> None:
    async def answer(head: bytes, request: bytes, reader: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for i in range(3):
            writer.write(b'data: {"n":%d}\n\n' % i)
            await writer.drain()
            await asyncio.sleep(0.01)
        return False  # and close

    async with RawBackend(answer).running() as backend, run_balancer(make_config([backend.url])) as balancer:
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            writer.write(_post(CHAT))
            _, raw = await asyncio.wait_for(_read_chunked(reader), 5)
            writer.write(_post(CHAT))  # the client's connection is still good
            head, _ = await asyncio.wait_for(_read_chunked(reader), 5)
        finally:
            writer.close()
    payload = b"".join(piece for i, piece in enumerate(raw.split(b"\r\n")) if i % 2 == 1)
    assert payload == b"".join(b'data: {"n":%d}\n\n' % i for i in range(3))
    assert raw.endswith(b"0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")


async def test_a_connection_goes_to_aiohttp_at_its_first_request_for_another_path_and_is_served_to_its_end() -> None:
    async def answer(head: bytes, request: bytes, reader: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(REPLY), REPLY))
        return True

    async with RawBackend(answer).running() as backend, run_balancer(make_config([backend.url])) as balancer:
        await wait_for(lambda: all(b.routable for b in balancer.components.registry))
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            # Lean, then the balancer's own path (handed over), then lean routes again on aiohttp, pipelined.
            writer.write(_post(PLAIN, extra=b"X-Request-ID: one\r\n"))
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + _post(PLAIN, extra=b"X-Request-ID: three\r\n"))
            statuses = []
            for _ in range(3):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                statuses.append((head.split(b" ")[1], b"x-request-id: three" in head.lower()))
        finally:
            writer.close()
    assert statuses == [(b"200", False), (b"200", False), (b"200", True)]


async def test_pipelined_requests_are_answered_in_order_on_the_lean_relay() -> None:
    async def answer(head: bytes, request: bytes, reader: Any, writer: asyncio.StreamWriter) -> bool:
        n = json.loads(request)["n"]
        await asyncio.sleep(0.02 * (3 - n))  # the first asked answers last
        reply = b'{"n":%d}' % n
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
        return True

    async with RawBackend(answer).running() as backend, run_balancer(make_config([backend.url])) as balancer:
        await wait_for(lambda: all(b.routable for b in balancer.components.registry))
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            writer.write(b"".join(_post(b'{"model":"m","n":%d}' % n) for n in range(3)))
            got = []
            for _ in range(3):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                got.append(json.loads(await reader.readexactly(length))["n"])
        finally:
            writer.close()
    assert got == [0, 1, 2]


async def test_a_usage_event_split_over_chunks_and_reads_is_cut_and_counted() -> None:
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7}}\n\n'
    content = [b'data: {"id":"c","choices":[{"delta":{"content":"t%d"}}]}\n\n' % i for i in range(3)]
    seen: list[bytes] = []

    async def answer(head: bytes, request: bytes, reader: Any, writer: asyncio.StreamWriter) -> bool:
        seen.append(request)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        framed = _chunked(*content, usage[:30], usage[30:], b"data: [DONE]\n\n")
        for at in range(0, len(framed), 50):
            writer.write(framed[at : at + 50])
            await writer.drain()
            await asyncio.sleep(0.002)
        return True

    async with (
        RawBackend(answer, health=b"").running() as backend,
        run_balancer(make_config([backend.url])) as balancer,
    ):
        await wait_for(lambda: all(b.health.detected_kind == "openai" for b in balancer.components.registry))
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            writer.write(_post(CHAT))
            _, raw = await asyncio.wait_for(_read_chunked(reader), 5)
        finally:
            writer.close()
        (b,) = balancer.components.registry
        assert (b.traffic.prompt_tokens_total, b.traffic.completion_tokens_total) == (11, 7)
    assert json.loads(seen[0])["stream_options"] == {"include_usage": True}
    payload = b"".join(piece for i, piece in enumerate(raw.split(b"\r\n")) if i % 2 == 1)
    assert payload == b"".join(content) + b"data: [DONE]\n\n"


async def test_llama_cpps_finish_chunk_arriving_in_many_reads_still_gives_its_token_counts() -> None:
    # On a busy machine one write of llama-server's can come in several reads: the usage is read from the body's
    # last bytes, which must then hold the whole finish chunk (keeping only the last two reads lost it).
    finish = (
        b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":"chat.completion.chunk",'
        b'"usage":{"completion_tokens":5,"prompt_tokens":169,"total_tokens":174},"timings":{"cache_n":160,'
        b'"prompt_n":9,"prompt_ms":12.5,"predicted_n":5,"predicted_ms":50.0}}\n\n'
    )
    content = [b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % i for i in range(5)]

    framed = _chunked(*content, finish, b"data: [DONE]\n\n")
    async with (
        RawBackend(_in_pieces(framed, 24)).running() as backend,
        run_balancer(make_config([backend.url])) as balancer,
    ):
        _, raw = await _one_stream(balancer.port)
        (b,) = balancer.components.registry
        await wait_for(lambda: b.traffic.prompt_tokens_total > 0)
        assert (b.traffic.prompt_tokens_total, b.traffic.completion_tokens_total) == (169, 5)
    assert raw == framed


async def test_a_client_that_stops_reading_among_a_thousand_streams_is_held_back_alone() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * 1001 + 200  # client, front, upstream and backend sockets all live in this process
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    big = b'data: {"t":"%s"}\n\n' % (b"x" * 16384)
    small = b'data: {"t":"y"}\n\n'
    written = {"slow": 0}
    slow_stream_done = asyncio.Event()

    async def answer(head: bytes, request: bytes, reader: Any, writer: asyncio.StreamWriter) -> bool:
        slow = b"slow" in request
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(SLOW_EVENTS if slow else 10):
            writer.write(b"%x\r\n%s\r\n" % (len(big if slow else small), big if slow else small))
            await writer.drain()  # held here once the balancer stops reading this stream
            if slow:
                written["slow"] += 1
            else:
                await asyncio.sleep(0.01)
        writer.write(_chunked(b"data: [DONE]\n\n"))
        if slow:
            slow_stream_done.set()
        return True

    connecting = asyncio.Semaphore(50)  # the test balancer listens with aiohttp's backlog of 128

    async def stream(body: bytes) -> int:
        async with connecting:
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            writer.write(_post(body))
            _, raw = await _read_chunked(reader)
            return raw.count(b"data: {")
        finally:
            writer.close()

    try:
        async with RawBackend(answer).running() as backend:
            config = make_config([backend.url], **{"timeouts.idle": 10.0, "queue.max_size": 5000})
            async with run_balancer(config) as balancer:
                await wait_for(lambda: all(b.routable for b in balancer.components.registry))
                slow_body = json.dumps({"model": "m", "stream": True, "slow": 1}).encode()
                reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
                writer.write(_post(slow_body))
                await reader.readuntil(b"\r\n\r\n")  # then read nothing for a while
                started = time.monotonic()
                counts = await asyncio.wait_for(asyncio.gather(*(stream(CHAT) for _ in range(1000))), 60)
                assert counts == [10] * 1000  # the others were unaffected
                assert time.monotonic() - started < 30
                # Backpressure reached the backend: it wrote what the sockets' buffers hold, then waited.
                stalled_at = written["slow"]
                assert stalled_at < SLOW_EVENTS // 2 and not slow_stream_done.is_set()
                await asyncio.sleep(0.5)
                assert written["slow"] - stalled_at < 50  # still held
                # Reading again, the stream moves on; hanging up, it ends as the client's doing.
                await asyncio.wait_for(reader.readexactly(8 << 20), 20)
                await wait_for(lambda: written["slow"] > stalled_at + 100, timeout=10)
                writer.close()
                (b,) = balancer.components.registry
                await wait_for(lambda: b.traffic.in_flight == 0, timeout=5)
                assert b.traffic.errors_total == 0 and b.state is BackendState.HEALTHY
                assert not slow_stream_done.is_set()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
