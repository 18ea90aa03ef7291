"""The front of every client connection: the hot requests are read here and relayed by the lean leg; any
other connection is handed to aiohttp's server (``connection.ClientConnection``) as it stands.

A connection stays here while what it sends is a plain hot request: ``POST`` of a JSON body with a
``Content-Length`` to one of the OpenAI and llama.cpp generation routes (``Lean.paths``), HTTP/1.1, an
origin-form target, a head that came whole and that httptools (llhttp, as aiohttp's own parser) reads
without complaint, no ``Transfer-Encoding``, ``Expect``, ``Content-Encoding`` or ``Upgrade``, a body
within ``server.max_body_bytes``. At the first request that is anything else (a path of the balancer's
own, a head still arriving, an HTTP/1.0 client, a malformed line) the transport is given to a new
aiohttp protocol (``transport.set_protocol``) along with the bytes read so far, and aiohttp serves that
connection to its end exactly as it would have from the start: the handover happens between requests,
before a byte of an answer.

Deadlines, as ``connection.py`` keeps them for aiohttp's connections: ``header_timeout`` from the
connection's opening to its first head (408), ``body_timeout`` of no progress while a body arrives (408,
then close), ``keepalive_timeout`` between requests (close). One sweep (``relay.sweep``) keeps them all.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
import structlog

from llmbalancer import errors
from llmbalancer.relay.inbound import choose_request_id, is_json_api_route
from llmbalancer.relay.lean import LeanRequest, serve
from llmbalancer.relay.sweep import Sweep
from llmbalancer.relay.wire import HOP_BY_HOP, error_response

if TYPE_CHECKING:
    from llmbalancer.relay.proxy import Proxy
    from llmbalancer.relay.stream import StreamRelay

log = structlog.get_logger("llmbalancer.connection")

_MAX_HEAD = 16384
_MAX_PENDING = 65536  # pipelined bytes held while a request is served; past this, reading pauses
_REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"content-length", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"
}
# Header names the front looks at; anything in _REFUSED sends the request to aiohttp.
_LENGTH, _HOST, _TYPE, _CONNECTION, _ID, _FORWARDED, _AUTHORIZATION, _API_KEY, _REFUSED = range(9)
_INTEREST = {
    b"content-length": _LENGTH, b"host": _HOST, b"content-type": _TYPE, b"connection": _CONNECTION,
    b"x-request-id": _ID, b"x-forwarded-for": _FORWARDED, b"authorization": _AUTHORIZATION, b"x-api-key": _API_KEY,
    b"transfer-encoding": _REFUSED, b"expect": _REFUSED, b"content-encoding": _REFUSED, b"upgrade": _REFUSED,
}
_HEAD_408, _CLOSE, _BODY_408 = range(3)


class Lean:
    """What every front connection of one server shares: the proxy, the hot paths, the limits, the sweep."""

    def __init__(
        self, proxy: Proxy, paths: frozenset[str], *, header_timeout: float, body_timeout: float,
        keepalive_timeout: float, max_body: int, scheme: str = "http",
    ) -> None:
        self.proxy = proxy
        self.scheme = scheme.encode()  # X-Forwarded-Proto: https when the socket serves TLS
        self.paths = paths
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_body = max_body
        self.sweep = Sweep(min(1.0, min(header_timeout, body_timeout, keepalive_timeout) / 50))
        self.fronts: set[FrontConnection] = set()
        # Set by the server: a new aiohttp protocol for a connection handed over, and a head deadline to keep.
        self.hand_over: Callable[[float | None], asyncio.Protocol] | None = None

    def close(self) -> None:
        self.sweep.close()
        self.proxy.close_lean()


class FrontConnection(asyncio.Protocol):
    __slots__ = (
        "_body", "_count", "_deadline", "_expire", "_headers", "_lean", "_loop", "_opened", "_parser", "_peer",
        "_pending", "_reading_paused", "_stream", "_task", "_url", "_write_paused", "closing", "transport",
    )

    def __init__(self, lean: Lean) -> None:
        self._lean = lean
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser: Any = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._pending = b""
        self._task: asyncio.Task[None] | None = None
        self._stream: StreamRelay | None = None
        self._body: tuple[list[bytes], int, asyncio.Future[bytes]] | None = None  # parts, bytes due, the body
        self._deadline = 0.0
        self._expire = _CLOSE
        self._opened = 0.0
        self._count = 0
        self._peer = "unknown"
        self._write_paused = self._reading_paused = False
        self.closing = False

    # --- asyncio's protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer = str(peer[0])
        lean = self._lean
        lean.fronts.add(self)
        now = self._opened = self._loop.time()
        # A connection that sends nothing: 408 at header_timeout, or closed at keepalive_timeout if sooner.
        if lean.header_timeout <= lean.keepalive_timeout:
            self._arm(now + lean.header_timeout, _HEAD_408)
        else:
            self._arm(now + lean.keepalive_timeout, _CLOSE)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._lean.fronts.discard(self)
        self._lean.sweep.discard(self)
        stream = self._stream
        if stream is not None:
            stream.client_lost()  # the backend's connection is dropped at once; the request ends as client_closed
        elif self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._stream is not None:
            self._stream.client_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stream is not None:
            self._stream.client_resumed()

    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            body = self._body
            if body is not None:
                self._more_body(body, data)
                return
            self._pending += data  # the next request, pipelined: read once this one is answered
            if len(self._pending) > _MAX_PENDING and self.transport is not None and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            return
        if self._pending:
            data, self._pending = self._pending + data, b""
        self._take(data)

    def eof_received(self) -> bool | None:
        return None  # the client closed its side: the connection ends (and a request under way with it)

    # --- requests ---------------------------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """Serve the request at the start of ``data`` here, or hand the connection to aiohttp."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > _MAX_HEAD:
            self._hand_over(data)
            return
        start = end + 4
        request = self._read_head(data[:start])
        if request is None:
            self._hand_over(data)
            return
        self._count += 1
        self._lean.sweep.discard(self)
        stop = start + request.length
        if len(data) >= stop:
            body = data[start:stop]
            self._pending = data[stop:]
            self._feed_body(body)
            self._task = self._loop.create_task(serve(self._lean.proxy, self, request, body))
            return
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._body = ([data[start:]], request.length - (len(data) - start), future)
        self._arm(self._loop.time() + self._lean.body_timeout, _BODY_408)
        self._task = self._loop.create_task(serve(self._lean.proxy, self, request, future))

    def _more_body(self, body: tuple[list[bytes], int, asyncio.Future[bytes]], data: bytes) -> None:
        parts, due, future = body
        if len(data) < due:
            parts.append(data)
            self._body = (parts, due - len(data), future)
            self._deadline = self._loop.time() + self._lean.body_timeout  # it made progress
            return
        parts.append(data[:due])
        self._pending += data[due:]
        self._body = None
        self._lean.sweep.discard(self)
        whole = b"".join(parts)
        self._feed_body(whole)
        if not future.done():
            future.set_result(whole)

    def _read_head(self, head: bytes) -> LeanRequest | None:
        """The request ``head`` starts, when it is one for the lean relay; else None."""
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        self._headers = []
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._parser = None
            return None
        if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
            return None
        url = self._url
        query = url.find(b"?")
        raw_path = url if query < 0 else url[:query]
        if not raw_path.startswith(b"/") or b"%" in raw_path or b"#" in url or not raw_path.isascii():
            return None
        path = raw_path.decode()
        lean = self._lean
        if path not in lean.paths:
            return None
        length = host = forwarded = given = authorization = api_key = None
        content_type = b""
        drop = _REQUEST_DROP
        close = False
        headers = self._headers
        for name, value in headers:
            kind = _INTEREST.get(name.lower())
            if kind is None:
                continue
            if kind == _LENGTH:
                length = int(value)
            elif kind == _HOST:
                host = value
            elif kind == _TYPE:
                content_type = value
            elif kind == _CONNECTION:
                tokens = {token.strip().lower() for token in value.split(b",")}
                close = close or b"close" in tokens
                drop = drop | tokens
            elif kind == _ID:
                given = given if given is not None else value
            elif kind == _FORWARDED:
                forwarded = forwarded if forwarded is not None else value
            elif kind == _AUTHORIZATION:
                authorization = authorization if authorization is not None else value
            elif kind == _API_KEY:
                api_key = api_key if api_key is not None else value
            else:
                return None
        if length is None or host is None or length > lean.max_body:
            return None
        if not is_json_api_route("POST", path, content_type.decode("latin-1").lower()):
            return None
        return LeanRequest(
            target=url, path=path, headers=headers, length=length, host=host, client=self._peer,
            request_id=choose_request_id(given.decode("latin-1") if given is not None else ""), close=close,
            drop=frozenset(drop), forwarded_for=forwarded, started=time.monotonic(), scheme=lean.scheme,
            credentials=(authorization, api_key),
        )

    def _feed_body(self, body: bytes) -> None:
        """The parser is kept for the connection's next head: it has to see this request's end."""
        if self._parser is not None:
            try:
                self._parser.feed_data(body)
            except httptools.HttpParserError:
                self._parser = None

    # httptools' callbacks
    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    # --- the answer -------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def attach(self, stream: StreamRelay | None) -> None:
        """The response body now relayed to this connection (None: done), for flow control and hang-ups."""
        self._stream = stream
        if stream is not None and self._write_paused:
            stream.client_paused()

    def exchange_done(self, keep_alive: bool) -> None:
        """The request is answered: read the next one on this connection, or close it."""
        self._task = None
        self._stream = None
        body, self._body = self._body, None
        if body is not None:
            body[2].cancel()
            keep_alive = False  # its body was not read to its end: the rest is not a head
        transport = self.transport
        if transport is None:
            return
        if not keep_alive or self.closing:
            transport.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._pending:
            pending, self._pending = self._pending, b""
            self._take(pending)
        else:
            self._arm(self._loop.time() + self._lean.keepalive_timeout, _CLOSE)

    # --- deadlines and the end ----------------------------------------------------------------------------

    def _arm(self, deadline: float, expire: int) -> None:
        self._deadline = deadline
        self._expire = expire
        self._lean.sweep.add(self)

    def swept(self, now: float) -> None:
        if now < self._deadline:
            return
        self._lean.sweep.discard(self)
        transport = self.transport
        if transport is None:
            return
        if self._expire == _CLOSE:
            transport.close()
        elif self._expire == _HEAD_408:
            seconds = self._lean.header_timeout
            error = errors.request_timeout(f"The request head did not arrive within {seconds:g} s")
            log.info("request_refused", status=error.status, code=error.code, client=self._peer)
            transport.write(error_response(error, None, close=True))
            transport.close()
        elif self._body is not None:
            seconds = self._lean.body_timeout
            future = self._body[2]
            self._body = None
            if not future.done():
                future.set_exception(errors.request_timeout(f"The request body made no progress for {seconds:g} s"))

    def _hand_over(self, data: bytes) -> None:
        """aiohttp serves this connection from here on, starting with ``data``."""
        transport = self.transport
        hand_over = self._lean.hand_over
        assert transport is not None and hand_over is not None
        self._lean.fronts.discard(self)
        self._lean.sweep.discard(self)
        self.transport = None
        # A first head still arriving keeps the deadline it had from the connection's opening.
        protocol = hand_over(self._opened + self._lean.header_timeout if self._count == 0 else None)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        if data:
            protocol.data_received(data)

    def close(self) -> None:
        """Stop after the request under way (the server is shutting down)."""
        self.closing = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, grace: float | None) -> None:
        """Let the request under way finish within ``grace`` seconds, then cancel it; close."""
        self.closing = True
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), grace)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()
