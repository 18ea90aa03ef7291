"""The lean leg: a request the front connection parsed itself (``front.py``), sent on a kept-alive backend
connection of ours (``upstream.py``), its answer relayed from socket to socket (``stream.py``).

What a request does here is what it does through aiohttp (``proxy.Proxy.handle``): the same ``forward``
decides the backend, retries and outcomes; the same access event and observers see it. Only the bytes
move differently: the request's head is rebuilt from the client's header lines (hop-by-hop ones dropped,
``X-Forwarded-*`` and ``X-Request-ID`` added), the response's head from the backend's, and the body goes
through untouched (chunked framing included) unless the balancer cut its usage event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from llmbalancer import errors
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.relay.access import Access
from llmbalancer.relay.inbound import InboundBody, facts_of, parse_json_object
from llmbalancer.relay.leg import AttemptFailed, Relayed
from llmbalancer.relay.stream import PASS_CHUNKED, PASS_LENGTH, RECHUNK, StreamRelay
from llmbalancer.relay.upstream import Answer, ConnectFailed, UpstreamGone, address_of
from llmbalancer.relay.usage_chunk import UsageCut, cut_whole
from llmbalancer.relay.wire import HOP_BY_HOP, LAST_CHUNK, chunk, downstream_head, error_response

if TYPE_CHECKING:
    from llmbalancer.relay.proxy import Proxy

log = structlog.get_logger("llmbalancer.access")

CLIENT_CLOSED = 499
_REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"content-length", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"
}
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})  # http_headers.CREDENTIALS


class Front(Protocol):
    """What a lean request needs of its client's connection (``front.Front``)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def closing(self) -> bool: ...
    def write(self, data: bytes) -> None: ...
    def attach(self, stream: StreamRelay | None) -> None: ...
    def exchange_done(self, keep_alive: bool) -> None: ...


class RawHeaders(Mapping[str, str]):
    """The client's header lines as a case-insensitive mapping (the policies read one or two by name).
    ``credentials``: the ``Authorization`` and ``x-api-key`` values the front already found (the key check asks
    for both on every request when keys are configured), answered without a pass over the lines."""

    __slots__ = ("_credentials", "_pairs")

    def __init__(
        self, pairs: list[tuple[bytes, bytes]], credentials: tuple[bytes | None, bytes | None] | None = None
    ) -> None:
        self._pairs = pairs
        self._credentials = credentials

    def get(self, key: str, default: Any = None) -> Any:
        credentials = self._credentials
        if credentials is not None:
            if key == "Authorization":
                return default if credentials[0] is None else credentials[0].decode("latin-1")
            if key == "x-api-key":
                return default if credentials[1] is None else credentials[1].decode("latin-1")
        try:
            return self[key]
        except KeyError:
            return default

    def __getitem__(self, key: str) -> str:
        wanted = key.lower().encode("latin-1")
        for name, value in self._pairs:
            if name.lower() == wanted:
                return value.decode("latin-1")
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name.decode("latin-1") for name, _ in self._pairs))

    def __len__(self) -> int:
        return len({name.lower() for name, _ in self._pairs})


@dataclass(slots=True)
class LeanRequest:
    """What the front connection read of a request head it took for the lean relay."""

    target: bytes  # origin form, as sent
    path: str
    headers: list[tuple[bytes, bytes]]
    length: int
    host: bytes
    client: str
    request_id: str
    close: bool  # the client asked to close after this request
    drop: frozenset[bytes]  # header names not to forward (hop-by-hop, and those its Connection names)
    forwarded_for: bytes | None
    started: float
    scheme: bytes = b"http"  # the client's: https on a TLS socket
    credentials: tuple[bytes | None, bytes | None] = (None, None)  # its Authorization and x-api-key, if sent


async def serve(
    proxy: Proxy, front: Front, request: LeanRequest, body: bytes | asyncio.Future[bytes]
) -> None:
    """The whole of one lean request, as ``Proxy.handle`` is for aiohttp's."""
    access = Access(request.request_id, "POST", request.path, request.started)
    leg = LeanLeg(proxy, front, request)
    try:
        data = body if isinstance(body, bytes) else await body
        parsed = parse_json_object(data)
        headers = RawHeaders(request.headers, request.credentials)
        facts = facts_of("POST", request.path, request.client, headers, parsed)
        access.model = facts.model
        await proxy.forward(leg, InboundBody(data, None, parsed), facts, access)
    except ProxyError as error:
        access.status = error.status
        access.error = error.code
        leg.refuse(error, access)
    except asyncio.CancelledError:
        access.status = access.status or CLIENT_CLOSED
        access.error = access.error or "client_closed"
        leg.keep_alive = False
        raise
    except Exception:
        leg.unexpected(access)
    finally:
        proxy.completed(access)
        front.exchange_done(leg.keep_alive)


class LeanLeg:
    __slots__ = ("_forwarded", "_front", "_proxy", "_request", "keep_alive", "started")

    def __init__(self, proxy: Proxy, front: Front, request: LeanRequest) -> None:
        self._proxy = proxy
        self._front = front
        self._request = request
        self._forwarded: tuple[bytes, bytes] | None = None
        self.keep_alive = not request.close
        self.started = False  # the response's head went to the client

    async def open(self, backend: Backend, body: InboundBody, close: bool) -> Answer:
        address = address_of(backend.url)
        data = body.data
        assert data is not None
        end_to_end, credentials = self._end_to_end()
        if backend.api_key:
            credentials = b"Authorization: Bearer %s\r\n" % backend.api_key.encode()  # its own, in the client's place
        elif self._proxy.strips_credentials:
            credentials = b""  # the client's key is the balancer's: never forwarded
        head = b"POST %s%s HTTP/1.1\r\nHost: %s\r\n%s%sContent-Length: %d\r\n%s\r\n" % (
            address.prefix, self._request.target, address.netloc, end_to_end, credentials, len(data),
            b"Connection: close\r\n" if close else b"",
        )
        pool = self._proxy.pool
        deadlines, timeout = self._proxy.first_byte
        try:
            with deadlines.within(timeout, backend):
                conn = pool.take(address)
                if conn is None:
                    try:
                        conn = await pool.connect(address)
                    except ConnectFailed as exc:
                        raise AttemptFailed(str(exc), unreachable=True, body_sent=False) from None
                try:
                    return await conn.send(head, data, close)
                except UpstreamGone as exc:
                    raise AttemptFailed(str(exc), unreachable=False, body_sent=True) from None
                except BaseException:
                    conn.abort()  # cancelled or timed out: the backend sees the disconnect
                    raise
        except TimeoutError:
            if backend.routable:
                raise  # first_byte spent on a backend that still answers its health checks: 504
            raise AttemptFailed(
                f"{backend.state.value} before it answered (health checks failing)", unreachable=True, body_sent=True
            ) from None

    def _end_to_end(self) -> tuple[bytes, bytes]:
        """The client's end-to-end header lines and ours, the same for every attempt; and apart, the client's
        credentials (``Authorization``, ``x-api-key``), which depend on the backend and on keys."""
        forwarded = self._forwarded
        if forwarded is None:
            request = self._request
            drop = request.drop
            credentials: list[bytes] = []
            if request.credentials == (None, None):  # the front saw none: the one pass of old
                lines = [b"%s: %s\r\n" % (name, value) for name, value in request.headers if name.lower() not in drop]
            else:
                lines = []
                for name, value in request.headers:
                    lower = name.lower()
                    if lower not in drop:
                        (credentials if lower in _CREDENTIALS else lines).append(b"%s: %s\r\n" % (name, value))
            client = request.client.encode()
            chain = request.forwarded_for + b", " + client if request.forwarded_for else client
            lines.append(
                b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\nX-Request-ID: %s\r\n"
                % (chain, request.scheme, request.host, request.request_id.encode())
            )
            forwarded = self._forwarded = (b"".join(lines), b"".join(credentials))
        return forwarded

    async def relay(self, upstream: Answer, access: Access, cut_usage: bool, backend: Backend) -> Relayed[None]:
        head = upstream.head
        access.status = head.status
        cut = cut_usage and head.event_stream
        front = self._front
        close = not self.keep_alive or front.closing
        request_id = self._request.request_id
        limits = access.limit_headers.lines() if access.limit_headers else b""  # a keyed request's x-ratelimit-*
        whole = upstream.whole()
        if whole is not None:
            body = cut_whole(whole) if cut and whole else whole
            framing = b"" if head.bodiless else b"Content-Length: %d\r\n" % len(body)
            self.started = True
            front.write(downstream_head(head, request_id, framing + limits, close, bool(limits)) + body)
            if whole:
                access.ttfb = time.monotonic()
            access.bytes = len(body)
            access.usage_tail = whole
            return Relayed(None)
        if head.chunked and not cut:
            mode, framing = PASS_CHUNKED, _CHUNKED
        elif head.length is not None and not cut:
            mode, framing = PASS_LENGTH, b"Content-Length: %d\r\n" % head.length
        else:
            mode, framing = RECHUNK, _CHUNKED
        transport = front.transport
        if transport is None:
            raise asyncio.CancelledError  # the client left as the answer came
        stream = StreamRelay(
            transport, upstream, access, mode, UsageCut() if cut else None, self._proxy.streams,
            self._proxy.idle_timeout,
        )
        self.started = True
        front.attach(stream)
        try:
            ending = await stream.start(
                downstream_head(head, request_id, framing + limits, close, bool(limits)), upstream.early
            )
        except asyncio.CancelledError:
            stream.client_lost()
            raise
        finally:
            front.attach(None)
        if ending.client_left is not None:
            access.error = ending.client_left
            self.keep_alive = False
            return Relayed(None, client_left=True)
        if ending.broken is None:
            return Relayed(None)
        access.error = "upstream_stream_broken"
        if head.event_stream and framing == _CHUNKED and stream.client_framing_whole:
            # The chunked framing is intact: an error event the SDKs raise, the final chunk, and the connection
            # kept (pooling clients send their next request on it at once).
            front.write(chunk(errors.upstream_failed_mid_stream(ending.broken).sse_event()) + LAST_CHUNK)
        else:
            self.keep_alive = False  # closing without the body's end is the only way to say it is incomplete
        return Relayed(None, broken=ending.broken)

    def refuse(self, error: ProxyError, access: Access) -> None:
        """Answer ``error`` in place of a backend's response (or cut the connection if one had started)."""
        if self.started:
            self.keep_alive = False
            return
        if error.status == 408:
            self.keep_alive = False  # the body never came whole: what follows on this connection is not a head
        close = not self.keep_alive or self._front.closing
        limits = access.limit_headers.lines() if access.limit_headers else b""
        self._front.write(error_response(error, self._request.request_id, close, limits))

    def unexpected(self, access: Access) -> None:
        """The last line against a bug, as ``access.answer_unexpected``: logged once, a 500 or a cut connection."""
        log.exception("unhandled_error", request_id=access.request_id, method=access.method, path=access.path)
        error = errors.internal_error()
        access.error = error.code
        if not self.started:
            access.status = error.status
        self.refuse(error, access)
