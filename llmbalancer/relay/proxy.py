"""Relay one request to a backend and stream its answer back, chunk by chunk, as it is written.

Retries: a failure before any response byte reached the client (refused connection, dropped
connection, a 5xx status, a backend that left rotation as unhealthy while the request waited for its
answer) is retried on another backend, up to ``retries.attempts``. Once bytes
have gone to the client the request is never replayed: a backend failing mid-stream ends an SSE
stream with an ``error`` event (the OpenAI SDK raises it) and any other body by closing the
connection without its terminator, so the client cannot mistake it for a complete answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from yarl import URL

from llmbalancer import errors
from llmbalancer.config import Config
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.registry import Registry
from llmbalancer.relay.access import Access, answer_unexpected
from llmbalancer.relay.deadlines import Deadlines
from llmbalancer.relay.exchange import Adapter, Exchange
from llmbalancer.relay.http_headers import downstream_response_headers, upstream_request_headers
from llmbalancer.relay.inbound import InboundBody, origin_form, read_body, request_facts, with_model
from llmbalancer.relay.inbound import request_id as _request_id
from llmbalancer.relay.leg import AttemptFailed, Leg, Relayed
from llmbalancer.relay.quirks import drops_connections_reused_after_a_stream
from llmbalancer.relay.sweep import Sweep
from llmbalancer.relay.upstream import UpstreamPool
from llmbalancer.relay.upstream_words import broke_off, describe
from llmbalancer.relay.usage_chunk import UsageCut, asks_usage_of, cut_whole, wants_usage, with_usage
from llmbalancer.scheduling.claims import Claim
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.racing import Racing
from llmbalancer.scheduling.selectors import RequestFacts

# Statuses that mean "this backend could not take it", worth another backend when one is left.
RETRY_STATUSES = frozenset({500, 502, 503, 504})
CLIENT_CLOSED = 499  # nginx's convention, for the access log only
_WHOLE_BODY_MAX = 65536  # a reply up to this size that arrived with its headers is relayed in one write


R = TypeVar("R")


class _ClientStopped(Exception):
    """Writing to the client failed or stalled: the client's doing, not the backend's."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _AiohttpLeg:
    """The leg of requests aiohttp's server parsed: aiohttp's client, aiohttp's response writer. With an
    adapter (relay/exchange.py: Ollama's API over other backends), each attempt asks it what to send."""

    __slots__ = ("_adapter", "_proxy", "_request", "_request_id")

    def __init__(self, proxy: Proxy, request: web.Request, request_id: str, adapter: Adapter | None) -> None:
        self._proxy = proxy
        self._request = request
        self._request_id = request_id
        self._adapter = adapter

    def open(self, backend: Backend, body: InboundBody, close: bool) -> Awaitable[aiohttp.ClientResponse]:
        if self._adapter is not None:
            return self._proxy._open_adapted(self._request, backend, body, self._request_id, self._adapter, close)
        return self._proxy._open(self._request, backend, body, self._request_id, close)

    def relay(
        self, upstream: aiohttp.ClientResponse, access: Access, cut_usage: bool, backend: Backend
    ) -> Awaitable[Relayed[web.StreamResponse]]:
        exchange = self._adapter.exchange_for(backend) if self._adapter is not None else None
        if exchange is not None:  # the adapter's hook: it relays its own exchange's answer
            return exchange.relay(self._request, upstream, access)
        return self._proxy._relay(self._request, upstream, access, cut_usage)


class Proxy:
    def __init__(self, config: Config, registry: Registry, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._racing = Racing(dispatcher)
        self.configure(config)
        # One sweep for every request's first-byte deadline instead of a timer each; 1 % late at most.
        self._first_byte = Deadlines(resolution=min(1.0, self._first_byte_timeout / 100))
        self.session: aiohttp.ClientSession | None = None
        # The lean relay's (relay/lean.py): kept-alive backend connections, and one sweep for every stream's
        # idle timeout, 1 % late at most.
        self.pool = UpstreamPool(config.timeouts.connect)
        self.streams = Sweep(min(1.0, self._idle_timeout / 100))
        # Called once per finished request (metrics, the monitor's recent requests); must be cheap.
        self.on_complete: list[Callable[[Access], None]] = []
        # A hung server accepts connections and answers nothing: once its health checks fail, the
        # requests waiting on it for a first byte are retried elsewhere instead of waiting out first_byte.
        registry.on_failed.append(self._first_byte.expire)

    def configure(self, config: Config) -> None:
        """The limits, timeouts and retries for requests that arrive from now on (a reload): each request
        reads them as it starts, so those in flight keep theirs."""
        self._max_body = config.server.max_body_bytes
        self._attempts = config.retries.attempts
        self._first_byte_timeout = config.timeouts.first_byte
        self._idle_timeout = config.timeouts.idle
        self._connect_timeout = config.timeouts.connect
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)

    @property
    def first_byte(self) -> tuple[Deadlines, float]:
        """The first-byte deadlines and their timeout, for a leg's ``open``."""
        return self._first_byte, self._first_byte_timeout

    @property
    def idle_timeout(self) -> float:
        return self._idle_timeout

    def close_lean(self) -> None:
        self.pool.close()
        self.streams.close()

    def open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0,
            # llama-server closes idle keep-alive connections after 5 s; drop ours first so a pooled
            # connection is never one the backend is closing.
            keepalive_timeout=4.0,
            ttl_dns_cache=60,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            # Send the client's headers only: no Accept-Encoding the client did not ask for.
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self.session

    async def handle(self, request: web.Request, adapter: Adapter | None = None) -> web.StreamResponse:
        """Proxy one request aiohttp parsed; ``adapter``: the hook of routes that may not be forwarded as they
        are (relay/exchange.py; Ollama's API, from web/ollama.py). Without one, requests go as they came."""
        access = Access(_request_id(request), request.method, request.path, time.monotonic())
        try:
            body = await read_body(request, self._max_body)
            facts = request_facts(request, body)
            access.model = facts.model
            leg = _AiohttpLeg(self, request, access.request_id, adapter)
            return await self.forward(leg, body, facts, access)
        except ProxyError as error:
            access.status = error.status
            access.error = error.code
            if adapter is not None:
                return adapter.error_response(error, access.request_id)
            return error.response(access.request_id)
        except asyncio.CancelledError:
            access.status = access.status or CLIENT_CLOSED
            access.error = access.error or "client_closed"
            raise
        except Exception:
            return answer_unexpected(request, access)
        finally:
            self.completed(access)

    def completed(self, access: Access) -> None:
        """The request is over: its one access event, and the observers told."""
        access.emit()
        for observer in self.on_complete:
            observer(access)

    async def forward(self, leg: Leg[Any, R], body: InboundBody, facts: RequestFacts, access: Access) -> R:
        """Claim a backend, open the request on it through ``leg``, retry what may be retried, relay the
        answer and record the outcome on the claim; the leg's response."""
        excluded: list[Backend] = []
        last_error = ""
        # A streamed OpenAI completion without usage: asked of the backends that report it nowhere else.
        ask_usage = wants_usage(facts.path, body.parsed)
        streamed = body.parsed is not None and body.parsed.get("stream") is True

        def opener(backend: Backend) -> Awaitable[Any]:
            # The body names the model as this backend knows it (an instance alias, say).
            sent = with_model(body, self._dispatcher.routing.rename_for(facts, backend))
            if ask_usage and asks_usage_of(backend):
                sent = with_usage(sent)
            close = streamed and drops_connections_reused_after_a_stream(backend)
            return leg.open(backend, sent, close)

        dropped_once = False
        limit = self._attempts
        attempt = 0
        while attempt < limit:
            attempt += 1
            claim = await self._claim(facts, excluded, access, attempt, last_error)
            try:
                try:
                    # Racing (off unless configured) may hand back another racer's claim: the winner's.
                    claim, upstream = await self._racing.open(claim, facts, excluded, body.replayable, opener)
                except AttemptFailed as failure:
                    backend = claim.backend
                    last_error = f"{backend.name}: {failure.reason}"
                    access.attempt_failed(last_error)
                    if not failure.unreachable and body.replayable and not dropped_once:
                        # Most likely a pooled connection the backend closed (its idle keep-alive timeout)
                        # just as we reused it: try once more, this backend included, before blaming it.
                        dropped_once = True
                        limit += 1  # the pool's fault, not the backend's: this try does not use up an attempt
                        claim.abandoned()
                        continue
                    claim.failed(failure.reason, unreachable=failure.unreachable)
                    excluded.append(backend)
                    if failure.body_sent and not body.replayable:
                        raise errors.upstream_unreachable(attempt, last_error) from None
                    continue
                except TimeoutError:
                    claim.failed("no response in time")
                    raise errors.upstream_timeout("response", self._first_byte_timeout) from None
                backend = claim.backend
                access.backend = backend.name
                try:
                    if upstream.status < 200:
                        # A 1xx final answer (101: the backend switched protocols unasked; hop-by-hop headers
                        # such as Upgrade never reach it): nothing a client of this request could use.
                        claim.failed(f"HTTP {upstream.status}")
                        raise errors.upstream_protocol_error(f"{upstream.status} {upstream.reason}, unasked")
                    if (
                        upstream.status in RETRY_STATUSES
                        and attempt < limit
                        and body.replayable
                        and self._dispatcher.candidates([*excluded, backend])
                    ):
                        last_error = f"{backend.name}: HTTP {upstream.status}"
                        access.attempt_failed(last_error)
                        claim.failed(f"HTTP {upstream.status}")
                        excluded.append(backend)
                        continue
                    relayed = await leg.relay(upstream, access, ask_usage and asks_usage_of(backend), backend)
                finally:
                    upstream.close()
                if relayed.client_left:
                    claim.abandoned()  # the backend did its part: neither a failure nor a success of its own
                elif relayed.broken is not None:
                    claim.failed(f"failed mid-stream: {relayed.broken}")
                else:
                    ttfb = None if access.ttfb is None else access.ttfb - access.started
                    claim.succeeded(access.read_usage(), ttfb, time.monotonic() - access.started)
                return relayed.response
            finally:
                claim.release()  # whatever happened above (cancellation included), the slot is given back
        raise errors.upstream_unreachable(attempt, last_error)

    async def _claim(
        self, facts: RequestFacts, excluded: list[Backend], access: Access, attempt: int, last_error: str
    ) -> Claim:
        """A claim for this attempt (waiting in the admission queue if need be); the first attempt's wait
        is the request's queue time."""
        try:
            asked = time.monotonic()
            claim = await self._dispatcher.claim(facts, excluded)
        except ProxyError:
            if last_error:
                raise errors.upstream_unreachable(attempt - 1, last_error) from None
            raise
        if attempt == 1:
            access.queue_wait = time.monotonic() - asked
        access.backend = claim.backend.name
        access.attempts = attempt
        return claim

    async def _open_adapted(
        self, request: web.Request, backend: Backend, body: InboundBody, request_id: str, adapter: Adapter,
        close: bool,
    ) -> aiohttp.ClientResponse:
        """Open the request the adapter makes of ``body`` for ``backend``, or ``body`` itself when it makes none.
        The adapter may refuse (``ProxyError``): it is asked here, in the attempt's coroutine, so a refusal never
        escapes an opener while racing starts several (and holds their claims)."""
        exchange = adapter.exchange(backend, body)
        if exchange is None:
            return await self._open(request, backend, body, request_id, close)
        close = exchange.streamed and drops_connections_reused_after_a_stream(backend)
        return await self._open(request, backend, exchange.body, request_id, close, exchange)

    async def _open(
        self, request: web.Request, backend: Backend, body: InboundBody, request_id: str, close: bool = False,
        exchange: Exchange | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the request; ``close``: ask the backend to close the connection after answering (never pooled);
        ``exchange``: the adapter's method, path and headers instead of the client's."""
        assert self.session is not None
        headers = upstream_request_headers(
            request.headers,
            request.headers.items(),
            client=request.remote or "unknown",
            scheme=request.scheme,
            host=request.host,
            request_id=request_id,
            keep_content_length=not body.replayable,
        )
        if close:
            headers.append(("Connection", "close"))
        method, path = request.method, origin_form(request)
        if exchange is not None:
            method, path, headers = exchange.method, exchange.path, exchange.headers(headers)
        url = URL(backend.url + path, encoded=True)
        data = body.data if body.replayable else body.stream
        try:
            with self._first_byte.within(self._first_byte_timeout, backend):
                return await self.session.request(
                    method, url, headers=headers, data=data, allow_redirects=False, timeout=self._timeout
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
        self, request: web.Request, upstream: aiohttp.ClientResponse, access: Access, cut_usage: bool = False
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
        idle = self._idle_timeout
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
                    previous, last = last, chunk
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
