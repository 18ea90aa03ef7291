"""A fake OpenAI-compatible backend (vLLM-like) that streams tokens at a fixed pace, for bench/stream_scale.py.

Raw asyncio on uvloop, no framework, so that only the relay in front of it is measured. A streamed chat
completion gets its first token at once and the rest at ``--rate`` tokens per second (one chunked SSE
event per token, one socket write), then a usage event when ``stream_options.include_usage`` asked for
it, then ``[DONE]``. Every stream due in the same 10 ms slot is written by one timer tick, so 10,000
streams cost 100 timer callbacks a second, not 100,000. ``GET /health`` answers 200 with an empty body
and ``GET /v1/models`` one model: an llmbalancer probing it sees a plain OpenAI-compatible server (as
vLLM), and asks it for usage on streams.

    python bench/paced_backend.py --port 9000 [--tokens 100] [--rate 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}]}\n\n'
)
_USAGE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":%d,"total_tokens":%d}}\n\n'
)
_DONE = b"data: [DONE]\n\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_MODELS = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]}).encode()
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ":"),
).encode()
_SLOT = 0.01


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_EVENT_CHUNK = _chunk(_EVENT)


def _json(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class _Stream:
    __slots__ = ("conn", "left", "sent", "usage")

    def __init__(self, conn: _Connection, tokens: int, usage: bool) -> None:
        self.conn = conn
        self.left = tokens
        self.sent = 0
        self.usage = usage


class Pacer:
    """Streams grouped by the 10 ms slot of the period they are due in; one tick writes a slot's streams."""

    def __init__(self, rate: float) -> None:
        self._slots = max(1, round(1 / rate / _SLOT))
        self._ring: list[list[_Stream]] = [[] for _ in range(self._slots)]
        self._at = 0
        self._loop = asyncio.get_running_loop()
        self._next = self._loop.time() + _SLOT
        self._loop.call_at(self._next, self._tick)

    def add(self, stream: _Stream) -> None:
        self._ring[(self._at + self._slots - 1) % self._slots].append(stream)  # due one period from now

    def _tick(self) -> None:
        self._at = (self._at + 1) % self._slots
        due = self._ring[self._at]
        if due:
            keep = []
            for stream in due:
                if _write_token(stream):
                    keep.append(stream)
            self._ring[self._at] = keep
        self._next += _SLOT
        now = self._loop.time()
        if self._next < now:  # fell behind: do not try to catch up in a burst
            self._next = now
        self._loop.call_at(self._next, self._tick)


def _write_token(stream: _Stream) -> bool:
    """Write the stream's next token (and its end after the last); whether it goes on."""
    transport = stream.conn.transport
    if transport is None or transport.is_closing():
        return False
    stream.left -= 1
    stream.sent += 1
    if stream.left > 0:
        transport.write(_EVENT_CHUNK)
        return True
    tail = _EVENT + (_USAGE % (stream.sent, stream.sent + 9) if stream.usage else b"")
    transport.write(_chunk(tail) + _chunk(_DONE) + b"0\r\n\r\n")
    stream.conn.streaming = False
    stream.conn.serve_buffered()
    return False


class _Connection(asyncio.Protocol):
    def __init__(self, pacer: Pacer, tokens: int) -> None:
        self._pacer = pacer
        self._tokens = tokens
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self.serve_buffered()

    def serve_buffered(self) -> None:
        while not self.streaming and self.transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            marker = head.find(b"content-length:")
            length = int(head[marker + 15 :].split(b"\r\n", 1)[0]) if marker >= 0 else 0
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4 : end + 4 + length]).replace(b" ", b"")
            del self._buffer[: end + 4 + length]
            if b'"stream":true' in body:
                self.streaming = True
                self.transport.write(_STREAM_HEAD + _EVENT_CHUNK)  # the first token at once
                stream = _Stream(self, self._tokens - 1, b'"include_usage":true' in body)
                stream.sent = 1
                if stream.left:
                    self._pacer.add(stream)
                else:
                    stream.left = 1
                    _write_token(stream)
            elif head.startswith(b"get /health"):
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            elif head.startswith(b"get /v1/models"):
                self.transport.write(_json(_MODELS))
            else:
                self.transport.write(_json(_COMPLETION))


async def _serve(port: int, tokens: int, rate: float) -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(rate)
    server = await loop.create_server(lambda: _Connection(pacer, tokens), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per stream")
    parser.add_argument("--rate", type=float, default=10.0, help="tokens per second per stream")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.port, args.tokens, args.rate))
    else:
        uvloop.run(_serve(args.port, args.tokens, args.rate))


if __name__ == "__main__":
    main()
