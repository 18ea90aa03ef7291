"""A backend that answers instantly, for the proxy-overhead benchmark: raw asyncio (uvloop), no framework.

POST with ``"stream": true`` in the body: a llama.cpp-shaped SSE stream of ``--events`` chat chunks and
``[DONE]``, chunked, one socket write per event, yielding to the loop between events so that concurrent
streams interleave as token streams do (zero token delay). Any other request: a small JSON body with
Content-Length (``/health`` answers ``{"status":"ok"}``, which is all the proxies' probes need).

Not the project's test fake (``llmbalancer/testing/fake_llama.py``): that one is faithful; this one is fast,
so that the proxy under test is always the bottleneck, never the backend.

    python bench/instant_backend.py --port 9000 [--events 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

_EVENT = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" token"}}],"created":1700000000,'
    b'"id":"chatcmpl-bench","model":"bench","system_fingerprint":"b1","object":"chat.completion.chunk"}\n\n'
)
_DONE = b"data: [DONE]\n\n"
_COMPLETION = json.dumps(
    {
        "choices": [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": "Hello!"}}],
        "created": 1700000000, "model": "bench", "object": "chat.completion", "id": "chatcmpl-bench",
        "usage": {"completion_tokens": 2, "prompt_tokens": 9, "total_tokens": 11},
    },
    separators=(",", ":"),
).encode()
_HEALTH = b'{"status":"ok"}'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_EVENT_CHUNK = _chunk(_EVENT)
_END = _chunk(_DONE) + b"0\r\n\r\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _json_response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class _Connection(asyncio.Protocol):
    def __init__(self, events: int) -> None:
        self._events = events
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._streaming is not None:
            self._streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while self._streaming is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            length = 0
            marker = head.find(b"content-length:")
            if marker >= 0:
                length = int(head[marker + 15:].split(b"\r\n", 1)[0])
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4:end + 4 + length])
            del self._buffer[:end + 4 + length]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self._transport is not None
        if b'"stream":true' in body.replace(b" ", b""):
            self._streaming = asyncio.get_running_loop().create_task(self._stream())
        elif head.startswith((b"get /health", b"get /v1/models", b"get /get_")):
            self._transport.write(_json_response(_HEALTH))
        else:
            self._transport.write(_json_response(_COMPLETION))

    async def _stream(self) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(_STREAM_HEAD)
        for _ in range(self._events):
            await asyncio.sleep(0)
            if transport.is_closing():
                return
            transport.write(_EVENT_CHUNK)
        transport.write(_END)
        self._streaming = None
        self._serve_buffered()


async def _serve(port: int, events: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(events), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=100, help="SSE chunks per stream before [DONE]")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.port, args.events))
    else:
        uvloop.run(_serve(args.port, args.events))


if __name__ == "__main__":
    main()
