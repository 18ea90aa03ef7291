"""A client's connection, before and around the handlers: how long the balancer waits for a request head,
for a body that stopped arriving, and between requests on a kept-alive connection; and the answer to what
aiohttp's HTTP parser refuses (OpenAI-style JSON, not its text/plain and a traceback in the log).

* A head (request line and headers) not complete within ``server.header_timeout`` of its first byte, or
  of the connection opening (a connection that sends nothing), gets 408 and the connection closes.
* A body that makes no progress (no byte arrives) for ``server.body_timeout`` fails the handler's read with
  a 408 ``ProxyError`` and the connection closes after the answer. A slow but steady upload goes on; time
  the balancer itself stops reading (the body's buffer is full) is not held against the client.
* A request line that is not HTTP/1.x (HTTP/0.9's bare ``GET /``, which the parser would take as a head
  still waiting for its headers) is answered 400 as soon as the line is complete.
* ``server.keepalive_timeout``: aiohttp's own keep-alive timer, the idle time between requests (it counts
  from the last response, so a head still arriving when it runs out is cut too).

Cost: no task, and per request no timer. One timer handle per connection is armed when a head starts or
the connection opens; firing early it re-arms for the deadline that has moved on since (aiohttp's
keep-alive timer works the same way). Per chunk of body, one clock read.
"""

from __future__ import annotations

import asyncio
import http
import time
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from llmbalancer import errors
from llmbalancer.config import ServerConfig
from llmbalancer.errors import ProxyError
from llmbalancer.relay.access import Access, answer_unexpected
from llmbalancer.relay.front import FrontConnection, Lean
from llmbalancer.relay.inbound import LEAN_PATHS, request_id
from llmbalancer.relay.proxy import Proxy

log = structlog.get_logger("llmbalancer.connection")

_HEAD, _BODY = "head", "body"
_HTTP_1 = (b" HTTP/1.1", b" HTTP/1.0")
_MAX_LINE = 8190  # aiohttp's max_line_size: a longer request line is the parser's to refuse


@dataclass(frozen=True, slots=True)
class _Limits:
    header_timeout: float
    body_timeout: float


class ClientConnection(RequestHandler):
    """aiohttp's per-connection protocol, with the head and body deadlines and JSON errors of this module."""

    __slots__ = ("_body", "_deadline", "_limits", "_line", "_phase", "_progress", "_timer", "head_due")

    def __init__(self, manager: web.Server, limits: _Limits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._phase: str | None = None  # what is awaited from the client: a head, a body, or nothing
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._line: bytes | None = None  # a request line seen in part, until it is complete and checked
        self._body: Any = None  # the StreamReader of the request whose body is arriving
        self._progress = 0.0
        self.head_due: float | None = None  # a connection handed over by the front: its first head's deadline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._phase, self._line = _HEAD, b""  # a connection that sends nothing times out too
        self._arm(self.head_due or self._loop.time() + self._limits.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        starting = False
        if phase is _BODY:
            self._progress = self._loop.time()
        elif data and phase is None and not self._request_in_progress and not self._close and not self._force_close:
            # A kept-alive connection's next head begins (bytes of a previous body would be phase _BODY).
            starting, self._line = True, b""
        if self._line is not None and not self._check_line(data):
            return
        count = self._request_count
        body = self._body
        super().data_received(data)
        if self._request_count != count:
            if body is not None and not body.is_eof():
                # A message after an unfinished body: aiohttp's 400 for broken chunked framing, queued while
                # the body was left waiting for the rest.
                reason = _first_line(getattr(self._messages[-1][0], "message", None)) if self._messages else ""
                body.set_exception(errors.unreadable_body(reason or "malformed chunked framing"))
                self._end_body(body)
                return
            # A head (or more, pipelined) is complete; only the last one's body can still be arriving.
            body = self._messages[-1][1] if self._messages else None
            if body is None or body.is_eof():
                self._phase = self._body = None
                return
            self._phase, self._body, self._progress = _BODY, body, self._loop.time()
            self._arm(self._progress + self._limits.body_timeout)
        elif starting:
            # The head did not come whole (the usual one does, and costs no timer): header_timeout from now.
            self._phase = _HEAD
            self._arm(self._loop.time() + self._limits.header_timeout)
            return
        if body is not None:
            if body.exception() is not None:
                self._end_body(body)  # a Content-Encoding that does not decode: the body has aiohttp's error
            elif body.is_eof():
                self._phase = self._body = None

    def _check_line(self, data: bytes) -> bool:
        """Whether the request line (seen so far) may be HTTP/1.x; refuses the request when it is not."""
        line = self._line + data if self._line else data
        start = 0
        end = line.find(b"\n")
        while end == start or (end == start + 1 and line[start] == 13):  # empty lines before it (RFC 9112 2.2)
            start = end + 1
            end = line.find(b"\n", start)
        if end < 0:
            self._line = line[start:] if len(line) - start <= _MAX_LINE else None
            return True
        self._line = None
        stop = end - 1 if end > start and line[end - 1] == 13 else end
        if line.endswith(_HTTP_1, start, stop):  # no copy of the line: this runs once per request
            return True
        parts = line[start:stop].split(b" ")
        if len(parts) == 2 or (len(parts) == 3 and parts[2].startswith(b"HTTP/")):
            version = "HTTP/0.9" if len(parts) == 2 else parts[2].decode("ascii", "replace")[:16]
            self._refuse(errors.unsupported_http_version(version))
        else:
            self._refuse(errors.bad_request("the request line is not 'METHOD target HTTP/1.1'"))
        return False

    def _arm(self, deadline: float) -> None:
        self._deadline = deadline
        timer = self._timer
        if timer is not None and timer.when() > deadline:
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        phase = self._phase
        if phase is None or self.transport is None:
            return
        now = self._loop.time()
        if phase is _BODY:
            if self._reading_paused or getattr(self, "_buffer_paused", False):
                self._progress = now  # the balancer is not reading: not the client's doing
            self._deadline = self._progress + self._limits.body_timeout
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        elif phase is _HEAD:
            seconds = self._limits.header_timeout
            self._refuse(errors.request_timeout(f"The request head did not arrive within {seconds:g} s"))
        else:
            self._stall_body()

    def _stall_body(self) -> None:
        """The handler's read of the body raises the 408; nothing more is read from this connection."""
        body = self._body
        if not self._request_in_progress:
            # Its handler has answered (aiohttp is reading the rest to discard it) or never started.
            self._phase = self._body = None
            self.force_close()
            return
        seconds = self._limits.body_timeout
        body.set_exception(errors.request_timeout(f"The request body made no progress for {seconds:g} s"))
        self._end_body(body)

    def _end_body(self, body: Any) -> None:
        """``body`` (its error set) ends here: marked complete, so that aiohttp does not linger reading the rest
        (it would meet the error again and log it as unhandled), and the connection closes after the answer."""
        self._phase = self._body = None
        body.feed_eof()
        self.close()

    def _refuse(self, error: ProxyError) -> None:
        """Answer ``error`` in place of a request whose head never made it to a handler, and close."""
        self._phase = self._line = None
        log.info("request_refused", status=error.status, code=error.code, client=self._peer())
        body = error.body()
        head = (
            f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        if self.transport is not None:
            self.transport.write(head.encode() + body)
        self.force_close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "unknown"

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's answer to a head its parser refused (400) or to an exception that escaped every handler
        and middleware (which ``web.guard`` makes a bug): OpenAI-style JSON, and one log event."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; only closing the connection is left")
        if status >= 500:
            access = Access(request_id(request), request.method, request.path, time.monotonic())
            response = answer_unexpected(request, access)
            access.emit()
        else:
            reason = _first_line(message or (str(exc) if exc else "")) or http.HTTPStatus(status).phrase
            error = errors.bad_request(reason)
            log.info("request_refused", status=error.status, code=error.code, reason=reason, client=self._peer())
            response = error.response()
        response.force_close()
        return response


def _first_line(text: str | None) -> str:
    """aiohttp's parser messages: a first line, then an excerpt of the bytes."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0].rstrip(": ") if lines else ""


class _Server(web.Server):
    def __init__(self, handler: Any, *, limits: _Limits, lean: Lean | None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._lean = lean
        if lean is not None:
            lean.hand_over = self._handed_over

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]  # the front, or aiohttp's own
        if self._lean is not None:
            return FrontConnection(self._lean)
        return ClientConnection(self, self._limits, loop=self._loop, **self._kwargs)

    def _handed_over(self, head_due: float | None) -> asyncio.Protocol:
        protocol = ClientConnection(self, self._limits, loop=self._loop, **self._kwargs)
        protocol.head_due = head_due
        return protocol

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        if self._lean is not None:
            for front in list(self._lean.fronts):
                front.close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's signature
        lean = self._lean
        fronts = list(lean.fronts) if lean is not None else []
        await asyncio.gather(super().shutdown(timeout), *(front.shutdown(timeout) for front in fronts))
        if lean is not None:
            lean.close()


class _AppRunner(web.AppRunner):
    __slots__ = ("_config",)

    def __init__(self, app: web.Application, config: ServerConfig, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._config = config

    async def _make_server(self) -> web.Server:
        # Starts the app and builds aiohttp's server for it; ours is the same but for its protocol class.
        plain = await super()._make_server()
        config = self._config
        return _Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            limits=_Limits(config.header_timeout, config.body_timeout),
            lean=_lean_for(self.app, config) if config.relay == "lean" else None,
            **plain._kwargs,
        )


def _lean_for(app: web.Application, config: ServerConfig) -> Lean | None:
    """The lean relay for ``app``: its proxy's catch-all route, less any hot path the app answers itself."""
    proxy = None
    claimed: set[str] = set()
    for route in app.router.routes():
        owner = getattr(route.handler, "__self__", None)
        if isinstance(owner, Proxy) and getattr(route.handler, "__func__", None) is Proxy.handle:
            proxy = owner
        elif route.resource is not None and route.resource.canonical in LEAN_PATHS:
            claimed.add(route.resource.canonical)
    if proxy is None:
        return None
    return Lean(
        proxy, LEAN_PATHS - claimed, header_timeout=config.header_timeout, body_timeout=config.body_timeout,
        keepalive_timeout=config.keepalive_timeout, max_body=config.max_body_bytes,
        scheme="https" if config.tls_cert is not None else "http",
    )


def app_runner(app: web.Application, server: ServerConfig, *, shutdown_timeout: float) -> web.AppRunner:
    """The runner ``serve`` (and the functional tests) serve the app with."""
    return _AppRunner(
        app,
        server,
        # A client hanging up cancels its handler, which aborts the upstream request at once.
        handler_cancellation=True,
        access_log=None,  # the proxy logs one structured event per request
        keepalive_timeout=server.keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
    )
