"""The lean relay's connections to backends: HTTP/1.1 over one asyncio protocol per connection, kept alive
in a pool per backend address.

A request is written in one ``write``; the response head is parsed in ``data_received`` and handed to the
awaiting request as an ``Answer`` (with whatever body bytes came along). From then on the body's bytes go
straight from ``data_received`` to the ``sink`` the relay attached (``stream.StreamRelay``): no task, no
queue, no copy. A connection goes back to the pool only after a body read to its end, on a response that
allows it; idle ones are closed after ``keepalive`` seconds (llama-server closes its own after 5 s, so
ours never hands out one the backend is closing), and at once when the backend closes them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from llmbalancer.relay.deadlines import Deadlines
from llmbalancer.relay.sweep import Sweep
from llmbalancer.relay.wire import Malformed, ResponseHead, parse_response_head

_MAX_HEAD = 65536
_DNS_TTL = 60.0


class UpstreamGone(Exception):
    """The connection ended (or the backend's head was unreadable) before a response head came whole."""


class ConnectFailed(Exception):
    """No connection could be made: the backend is unreachable."""


class Sink(Protocol):
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, exc: BaseException | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Address:
    scheme: str
    host: str
    port: int
    netloc: bytes  # the Host header's value
    prefix: bytes  # a path the backend's URL carries, put before the request's target
    literal: bool  # the host is an IP address (nothing to resolve)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


_addresses: dict[str, Address] = {}


def address_of(url: str) -> Address:
    address = _addresses.get(url)
    if address is None:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname or "127.0.0.1"
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        address = Address(
            parts.scheme, host, port, parts.netloc.encode("idna"), parts.path.rstrip("/").encode(), literal
        )
        if len(_addresses) > 4096:
            _addresses.clear()
        _addresses[url] = address
    return address


class Answer:
    """A response head from a backend, and the connection its body is still to come on. The answer is done
    with the connection once ``finish`` or ``close`` was called: it may carry another request by then."""

    __slots__ = ("_done", "conn", "early", "head")

    def __init__(self, conn: Upstream, head: ResponseHead, early: bytes) -> None:
        self.conn = conn
        self.head = head
        self.early = early  # body bytes that arrived with the head
        self._done = False

    @property
    def status(self) -> int:
        return self.head.status

    @property
    def reason(self) -> str:
        return self.head.reason.decode("latin-1")

    def whole(self) -> bytes | None:
        """The body, when it came whole with the head (or there is none); the connection is then done with."""
        head = self.head
        length = head.length
        if length is None or len(self.early) < length:
            return None
        body = self.early[:length]
        self.finish(head.reusable and len(self.early) == length)
        return body

    def finish(self, reusable: bool) -> None:
        """The body was read to its end: the connection goes back to the pool if ``reusable``, else closes."""
        if not self._done:
            self._done = True
            self.conn.finished(reusable)

    def close(self) -> None:
        """Done with this answer: a body not read to its end drops the connection (the backend sees it)."""
        if not self._done:
            self._done = True
            self.conn.abort()


class Upstream(asyncio.Protocol):
    __slots__ = (
        "_answer", "_buffer", "_closing", "_delivered", "_held", "_pool", "address", "idle_since", "sink", "transport",
    )

    def __init__(self, pool: UpstreamPool, address: Address) -> None:
        self._pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[Answer] | None = None
        self._buffer = b""
        self._closing = False  # the request asked the backend to close after answering
        self._delivered: Answer | None = None  # answered, its body not yet taken by a relay
        self._held = False  # reading paused while body bytes wait for the relay
        self.sink: Sink | None = None
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, head: bytes, body: bytes, close: bool = False) -> asyncio.Future[Answer]:
        """Write a whole request (``close``: it asks the backend to close after answering); the future is the
        response head."""
        transport = self.transport
        assert transport is not None and self._answer is None
        answer = self._answer = asyncio.get_running_loop().create_future()
        self._closing = close
        if len(body) < 65536:
            transport.write(head + body)  # one segment for the usual request
        else:
            transport.write(head)
            transport.write(body)
        return answer

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.upstream_data(data)
            return
        delivered = self._delivered
        if delivered is not None:
            # More of the body before the request's task took the answer up (a busy loop): kept for the relay.
            delivered.early += data
            if len(delivered.early) > _MAX_HEAD and not self._held and self.transport is not None:
                self._held = True
                self.transport.pause_reading()
            return
        answer = self._answer
        if answer is None:
            self.abort()  # bytes nobody asked for: this connection is not to be trusted again
            return
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    self._fail(UpstreamGone(f"a response head over {_MAX_HEAD} bytes"))
                else:
                    self._buffer = buffer
                return
            try:
                head = parse_response_head(buffer[:end])
            except Malformed as exc:
                self._fail(UpstreamGone(f"an unreadable response: {exc}"))
                return
            buffer = buffer[end + 4 :]
            if 100 <= head.status < 200 and head.status != 101:
                continue  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            break
        self._buffer = b""
        self._answer = None
        if not answer.done():
            delivered = self._delivered = Answer(self, head, buffer)
            answer.set_result(delivered)
        else:
            self.abort()

    def attach(self, sink: Sink) -> None:
        """From now on the body's bytes go to ``sink`` as they arrive."""
        self._delivered = None
        self.sink = sink
        if self._held:
            self._held = False
            if self.transport is not None:
                self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # the backend closed its side: so do we

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.upstream_lost(exc)
        elif self._answer is not None:
            reason = str(exc) if exc is not None and str(exc) else "the backend closed the connection"
            self._fail(UpstreamGone(f"{reason} before answering"))
        self._pool.forget(self)

    def _fail(self, error: Exception) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(error)
        self.abort()

    def finished(self, reusable: bool) -> None:
        """The response was read to its end: back to the pool if the response allows it, else closed."""
        self.sink = self._delivered = None
        if self._held:
            reusable = False
        if reusable and not self._closing and self.transport is not None and not self.transport.is_closing():
            self._pool.give_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.sink = self._delivered = None
        self._answer = None
        transport = self.transport
        if transport is not None:
            transport.abort()


class UpstreamPool:
    """Kept-alive connections per backend address, most recently used first."""

    def __init__(self, connect_timeout: float, keepalive: float = 4.0) -> None:
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._idle: dict[Address, list[Upstream]] = {}
        self._sweep = Sweep(min(1.0, keepalive / 4))
        self._resolved: dict[tuple[str, int], tuple[float, str]] = {}
        # Connect timeouts kept by one sweep, as first-byte deadlines are (a timer each cost more).
        self._connects = Deadlines(resolution=min(1.0, connect_timeout / 100))
        self._tls: ssl.SSLContext | None = None

    def take(self, address: Address) -> Upstream | None:
        """A kept-alive connection to ``address``, if one is idle."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                return conn
        return None

    async def connect(self, address: Address) -> Upstream:
        loop = asyncio.get_running_loop()
        try:
            with self._connects.within(self._connect_timeout):
                host = await self._resolve(loop, address)
                tls = self._tls_context() if address.tls else None
                _, conn = await loop.create_connection(
                    lambda: Upstream(self, address), host, address.port, ssl=tls,
                    server_hostname=address.host if tls is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"Connection timeout to host http://{address.host}:{address.port}") from None
        except OSError as exc:
            raise ConnectFailed(
                f"Cannot connect to host {address.host}:{address.port} [{exc.strerror or exc}]"
            ) from None
        return conn

    def give_back(self, conn: Upstream) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(conn.address, []).append(conn)
        self._sweep.add(self)

    def forget(self, conn: Upstream) -> None:
        idle = self._idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)

    def swept(self, now: float) -> None:
        oldest = now - self._keepalive
        for address, idle in list(self._idle.items()):
            while idle and idle[0].idle_since <= oldest:
                idle.pop(0).abort()
            if not idle:
                del self._idle[address]
        if not self._idle:
            self._sweep.discard(self)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        self._sweep.close()

    async def _resolve(self, loop: asyncio.AbstractEventLoop, address: Address) -> str:
        host = address.host
        if address.literal:
            return host
        key = (host, address.port)
        cached = self._resolved.get(key)
        now = loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await loop.getaddrinfo(host, address.port, type=socket.SOCK_STREAM)
        resolved = str(infos[0][4][0])
        self._resolved[key] = (now + _DNS_TTL, resolved)
        return resolved

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls
