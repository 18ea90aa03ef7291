"""The proxy's one hook for routes whose requests it may not forward as they are (Ollama's API over
backends that do not speak it): what an ``Adapter`` gives the proxy, and what a relay hands back.

The proxy stays the owner of the request's life — claim, attempts and retries before the first byte,
the first-byte deadline, the outcome on the claim guard, the access record — and asks the adapter, per
attempt, how to talk to the backend it claimed: ``exchange(backend, body)`` is ``None`` to forward the
request as is, or an ``Exchange`` that says where to send what, and relays the answer itself.
Requests without an adapter (every OpenAI route) never reach this module's types.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp
from aiohttp import web

from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.relay.access import Access
from llmbalancer.relay.inbound import InboundBody
from llmbalancer.relay.leg import Relayed


class Exchange(Protocol):
    """One attempt's request to one backend in the backend's own API, and the relay of its answer."""

    @property
    def method(self) -> str:
        """The HTTP method (``POST``, or ``GET`` for a request that sends no body)."""
        ...

    @property
    def path(self) -> str:
        """The backend's path (and query) to send ``body`` to."""
        ...

    @property
    def body(self) -> InboundBody:
        """What to send (whole, replayable)."""
        ...

    @property
    def streamed(self) -> bool:
        """Whether the backend is asked to stream (decides ``Connection: close`` for llama.cpp)."""
        ...

    def headers(self, forwarded: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The request headers to send, given those the proxy would forward."""
        ...

    async def relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, access: Access
    ) -> Relayed[web.StreamResponse]:
        """Answer the client from ``upstream``; fill ``access`` (status, ttfb, bytes, usage tail, error)."""
        ...


class Adapter(Protocol):
    """One request's adapter, made per request by the route that owns it."""

    def exchange(self, backend: Backend, body: InboundBody) -> Exchange | None:
        """How to send ``body`` (its model already named as ``backend`` knows it) to ``backend``: None to
        forward it as is. May raise ``ProxyError`` (a request this backend cannot be asked)."""
        ...

    def exchange_for(self, backend: Backend) -> Exchange | None:
        """The exchange ``exchange`` made for ``backend`` in this request (racing opens several)."""
        ...

    def error_response(self, error: ProxyError, request_id: str) -> web.Response:
        """An error the balancer answers itself, in the route's own shape."""
        ...
