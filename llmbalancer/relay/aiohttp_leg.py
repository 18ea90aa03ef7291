"""The aiohttp leg: requests aiohttp's server parsed (every one the lean front does not take: the balancer's
own routes, Ollama's, uploads, connections handed over), sent with aiohttp's client and answered through
aiohttp's response writer, chunk by chunk as the backend writes them. ``Proxy.forward`` decides the backend,
retries and outcomes; this module moves the bytes (``relay/lean.py`` is the other leg)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from llmbalancer import errors
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.usage import kept
from llmbalancer.relay.access import Access
from llmbalancer.relay.deadlines import Deadlines
from llmbalancer.relay.exchange import Adapter, Exchange
from llmbalancer.relay.http_headers import downstream_response_headers, upstream_request_headers
from llmbalancer.relay.inbound import InboundBody, origin_form
from llmbalancer.relay.leg import AttemptFailed, Relayed
from llmbalancer.relay.quirks import drops_connections_reused_after_a_stream
from llmbalancer.relay.upstream_words import broke_off, describe
from llmbalancer.relay.usage_chunk import UsageCut, cut_whole

_WHOLE_BODY_MAX = 65536  # a reply up to this size that arrived with its headers is relayed in one write


class Settings(Protocol):
    """What the leg reads of the proxy, as it is when each request starts (a reload may change it)."""

    @property
    def session(self) -> aiohttp.ClientSession | None: ...
    @property
    def first_byte(self) -> tuple[Deadlines, float]: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def client_timeout(self) -> aiohttp.ClientTimeout: ...
    @property
    def strips_credentials(self) -> bool: ...


class _ClientStopped(Exception):
    """Writing to the client failed or stalled: the client's doing, not the backend's."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class AiohttpLeg:
    """The leg of requests aiohttp's server parsed: aiohttp's client, aiohttp's response writer. With an
    adapter (relay/exchange.py: Ollama's API over other backends), each attempt asks it what to send."""

    __slots__ = ("_adapter", "_proxy", "_request", "_request_id")

    def __init__(self, proxy: Settings, request: web.Request, request_id: str, adapter: Adapter | None) -> None:
        self._proxy = proxy
        self._request = request
        self._request_id = request_id
        self._adapter = adapter

    def open(self, backend: Backend, body: InboundBody, close: bool) -> Awaitable[aiohttp.ClientResponse]:
        if self._adapter is not None:
            return self._open_adapted(backend, body, self._adapter, close)
        return self._open(backend, body, close)

    def relay(
        self, upstream: aiohttp.ClientResponse, access: Access, cut_usage: bool, backend: Backend
    ) -> Awaitable[Relayed[web.StreamResponse]]:
        exchange = self._adapter.exchange_for(backend) if self._adapter is not None else None
        if exchange is not None:  # the adapter's hook: it relays its own exchange's answer
            return exchange.relay(self._request, upstream, access)
        return self._relay(upstream, access, cut_usage)

    async def _open_adapted(
        self, backend: Backend, body: InboundBody, adapter: Adapter, close: bool
    ) -> aiohttp.ClientResponse:
        """Open the request the adapter makes of ``body`` for ``backend``, or ``body`` itself when it makes none.
        The adapter may refuse (``ProxyError``): it is asked here, in the attempt's coroutine, so a refusal never
        escapes an opener while racing starts several (and holds their claims)."""
        exchange = adapter.exchange(backend, body)
        if exchange is None:
            return await self._open(backend, body, close)
        close = exchange.streamed and drops_connections_reused_after_a_stream(backend)
        return await self._open(backend, exchange.body, close, exchange)

    async def _open(
        self, backend: Backend, body: InboundBody, close: bool, exchange: Exchange | None = None
    ) -> aiohttp.ClientResponse:
        """Send the request; ``close``: ask the backend to close the connection after answering (never pooled);
        ``exchange``: the adapter's method, path and headers instead of the client's."""
        request, request_id = self._request, self._request_id
        session = self._proxy.session
        assert session is not None
        headers = upstream_request_headers(
            request.headers,
            request.headers.items(),
            client=request.remote or "unknown",
            scheme=request.scheme,
            host=request.host,
            request_id=request_id,
            keep_content_length=not body.replayable,
            strip_credentials=self._proxy.strips_credentials,
            api_key=backend.api_key,
        )
        if close:
            headers.append(("Connection", "close"))
        method, path = request.method, origin_form(request)
        if exchange is not None:
            method, path, headers = exchange.method, exchange.path, exchange.headers(headers)
        url = URL(backend.url + path, encoded=True)
        data = body.data if body.replayable else body.stream
        try:
            deadlines, timeout = self._proxy.first_byte
            with deadlines.within(timeout, backend):
                return await session.request(
                    method, url, headers=headers, data=data, allow_redirects=False, timeout=self._proxy.client_timeout
                )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise AttemptFailed(describe(exc), unreachable=True, body_sent=False) from exc
        except aiohttp.ClientError as exc:
            # The client's own streamed body can fail while we send it (over the size limit); aiohttp
            # wraps that as a connection error, but it is the client's fault, not the backend's.
            if isinstance(exc.__cause__, ProxyError):
                raise exc.__cause__ from None
            raise AttemptFailed(describe(exc), unreachable=False, body_sent=True) from exc
        except TimeoutError:  # after aiohttp's: its connect timeout is a TimeoutError too
            if backend.routable:
                raise  # first_byte spent on a backend that still answers its health checks: 504
            raise AttemptFailed(
                f"{backend.state.value} before it answered (health checks failing)", unreachable=True, body_sent=True
            ) from None

    async def _relay(
        self, upstream: aiohttp.ClientResponse, access: Access, cut_usage: bool = False
    ) -> Relayed[web.StreamResponse]:
        """Relay the response; ``cut_usage``: drop the usage event the balancer asked for (usage_chunk.py)."""
        whole = usage_tail = _whole_body(upstream)
        cut_usage = cut_usage and upstream.content_type == "text/event-stream"
        if cut_usage and whole is not None:  # a stream that came whole: cut here, not in the pump
            whole = cut_whole(whole)
        response = (
            web.StreamResponse(status=upstream.status, reason=upstream.reason)
            if whole is None
            # Sent whole: aiohttp holds a Response's headers back to leave with its body in one write.
            else web.Response(body=whole, status=upstream.status, reason=upstream.reason)
        )
        response.headers.extend(downstream_response_headers(upstream.headers, upstream.headers.items()))
        response.headers["X-Request-ID"] = access.request_id
        if whole is None and upstream.content_length is not None:
            response.content_length = upstream.content_length
        access.status = upstream.status
        request = self._request
        try:
            await response.prepare(request)
            if whole is not None:
                # Nothing left to wait for: no idle timer, no read loop.
                if whole:
                    access.ttfb = time.monotonic()
                await response.write_eof()
                access.bytes = len(whole)
                access.usage_tail = usage_tail or whole
                return Relayed(response)
            broken = await self._pump(upstream, response, access, UsageCut(response.write) if cut_usage else None)
            if broken is None:
                await response.write_eof()
                return Relayed(response)
        except (_ClientStopped, ConnectionResetError) as stopped:
            # Closing here (and the upstream in _forward) frees the backend's slot.
            access.error = stopped.code if isinstance(stopped, _ClientStopped) else "client_closed"
            response.force_close()
            if request.transport is not None:
                request.transport.close()
            return Relayed(response, client_left=True)

        access.error = "upstream_stream_broken"
        if upstream.content_type == "text/event-stream" and response.headers.get("Transfer-Encoding") == "chunked":
            # The chunked framing is intact: end the stream with an error event the SDKs raise, then the
            # final chunk, and keep the connection (pooling clients send their next request on it at once).
            with contextlib.suppress(ConnectionError):
                await response.write(errors.upstream_failed_mid_stream(broken).sse_event())
                await response.write_eof()
        else:
            # A body of announced length, or not an event stream: closing without completing it is the only
            # way to tell the client the body is incomplete.
            response.force_close()
            if request.transport is not None:
                request.transport.close()
        return Relayed(response, broken=broken)

    async def _pump(
        self, upstream: aiohttp.ClientResponse, response: web.StreamResponse, access: Access, cut: UsageCut | None
    ) -> str | None:
        """Copy the body as it arrives; return why the backend broke off, or None when complete.
        With ``cut``, chunks go through it (it drops the usage event); the plain copy pays nothing for that.
        The idle timeout covers the writes too: a client that stops reading for that long is cut off
        (``_ClientStopped``), and that is not held against the backend."""
        reader = upstream.content
        write = response.write if cut is None else cut.write
        loop = asyncio.get_running_loop()
        idle = self._proxy.idle_timeout
        sent = 0
        previous = last = b""  # the tail, where token counts are; read once after the stream ends
        # Re-arming the timer costs a timer handle per chunk; re-arm only when it has drifted by 1 %
        # of the idle timeout, so the timeout fires after between 0.99 and 1.0 x idle of silence.
        slack = idle / 100
        writing = False
        try:
            async with asyncio.timeout_at(loop.time() + idle) as deadline:
                armed = loop.time()
                chunk = await reader.readany()
                if chunk:
                    access.ttfb = time.monotonic()
                    access.usage_head = chunk
                while chunk:
                    writing = True
                    await write(chunk)
                    writing = False
                    sent += len(chunk)
                    previous, last = kept(previous, last, chunk)
                    now = loop.time()
                    if now - armed > slack:
                        deadline.reschedule(now + idle)
                        armed = now
                    chunk = await reader.readany()
        except (aiohttp.ClientError, ConnectionResetError) as exc:
            if writing:
                raise _ClientStopped("client_closed") from exc
            return broke_off(exc, sent)
        except TimeoutError:
            if writing:
                raise _ClientStopped("client_stalled") from None
            return f"no data for {idle:g} s"
        finally:
            access.bytes = sent
        access.usage_tail = previous + last
        if cut is not None:
            await cut.finish()
            access.bytes = sent - cut.cut_bytes
            access.usage_tail = cut.usage or access.usage_tail
        return None


def _whole_body(upstream: aiohttp.ClientResponse) -> bytes | None:
    """The body when it came whole with the headers (the usual non-streamed reply), else None."""
    length = upstream.content_length
    if length is None or length > _WHOLE_BODY_MAX or not upstream.content.is_eof():
        return None
    return upstream.content.read_nowait()
