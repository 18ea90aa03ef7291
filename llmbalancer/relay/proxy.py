"""Relay one request to a backend and stream its answer back, chunk by chunk, as it is written.

Retries: a failure before any response byte reached the client (refused connection, dropped
connection, a 5xx status, a backend that left rotation as unhealthy while the request waited for its
answer) is retried on another backend, up to ``retries.attempts``. Once bytes
have gone to the client the request is never replayed: a backend failing mid-stream ends an SSE
stream with an ``error`` event (the OpenAI SDK raises it) and any other body by closing the
connection without its terminator, so the client cannot mistake it for a complete answer.

Client keys (``auth/``): ``forward`` is where both legs meet, so the key check is made there, once per request
(401, 404, 429), the key's rate-limit headers ride on whatever answer the request gets, and its in-flight
place and token count are settled when it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from llmbalancer import errors
from llmbalancer.auth.gate import KeyGate, RateLimited
from llmbalancer.config import Config
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.registry import Registry
from llmbalancer.relay.access import ACCESS, Access, answer_unexpected
from llmbalancer.relay.aiohttp_leg import AiohttpLeg
from llmbalancer.relay.deadlines import Deadlines
from llmbalancer.relay.exchange import Adapter
from llmbalancer.relay.inbound import InboundBody, read_body, request_facts, with_model
from llmbalancer.relay.inbound import request_id as _request_id
from llmbalancer.relay.leg import AttemptFailed, Leg
from llmbalancer.relay.quirks import drops_connections_reused_after_a_stream
from llmbalancer.relay.sweep import Sweep
from llmbalancer.relay.upstream import UpstreamPool
from llmbalancer.relay.usage_chunk import asks_usage_of, wants_usage, with_usage
from llmbalancer.scheduling.claims import Claim
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.fairness import keyed
from llmbalancer.scheduling.racing import Racing
from llmbalancer.scheduling.selectors import RequestFacts

# Statuses that mean "this backend could not take it", worth another backend when one is left.
RETRY_STATUSES = frozenset({500, 502, 503, 504})
CLIENT_CLOSED = 499  # nginx's convention, for the access log only


R = TypeVar("R")


class Proxy:
    def __init__(self, config: Config, registry: Registry, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._racing = Racing(dispatcher)
        self.keys = KeyGate(config.auth)
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
        self.keys.configure(config.auth)
        # Keys are configured: a client's Authorization / x-api-key is the balancer's, never forwarded.
        self.strips_credentials = self.keys.active

    @property
    def first_byte(self) -> tuple[Deadlines, float]:
        """The first-byte deadlines and their timeout, for a leg's ``open``."""
        return self._first_byte, self._first_byte_timeout

    @property
    def idle_timeout(self) -> float:
        return self._idle_timeout

    @property
    def client_timeout(self) -> aiohttp.ClientTimeout:
        return self._timeout

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
        access = request[ACCESS] = Access(_request_id(request), request.method, request.path, time.monotonic())
        try:
            body = await read_body(request, self._max_body)
            facts = request_facts(request, body)
            access.model = facts.model
            leg = AiohttpLeg(self, request, access.request_id, adapter)
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

    def forward(self, leg: Leg[Any, R], body: InboundBody, facts: RequestFacts, access: Access) -> Awaitable[R]:
        """Check the request's key (when keys are configured), then ``relay`` it; the leg's response. Without
        keys the relay's own coroutine is handed back: not a frame more per request."""
        if not self.keys.active:
            return self.relay(leg, body, facts, access)
        return self._keyed(leg, body, facts, access)

    async def _keyed(self, leg: Leg[Any, R], body: InboundBody, facts: RequestFacts, access: Access) -> R:
        gate = self.keys
        key = gate.authenticate(facts.headers)  # 401
        access.key_name = key.name
        try:
            # Counted in memory without awaiting anything (a coroutine less per request).
            grant = (
                gate.admit_now(key, facts.model, body.parsed) if gate.limits.local
                else await gate.admit(key, facts.model, body.parsed)
            )
        except RateLimited as limited:
            access.limit_headers = limited.headers
            raise limited.error from None
        access.limit_headers = grant.headers
        try:
            return await self.relay(leg, body, keyed(facts, key.name, key.priority), access)
        finally:
            correction = grant.release(access.tokens_used())
            if correction:
                await grant.settle(correction)

    async def relay(self, leg: Leg[Any, R], body: InboundBody, facts: RequestFacts, access: Access) -> R:
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
