"""The proxy's adapter for Ollama's routes (``relay.exchange.Adapter``): per attempt, forward the request as
it is to a backend that speaks Ollama, or translate it for the one that does not; errors in Ollama's shape."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web

from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.relay.inbound import InboundBody
from llmbalancer.translate import requests
from llmbalancer.translate.errors import from_proxy_error
from llmbalancer.translate.exchange import OllamaExchange
from llmbalancer.translate.kinds import family_of
from llmbalancer.translate.requests import Plan

Route = Literal["chat", "generate", "embed", "embeddings", "show"]
ROUTES: dict[str, Route] = {
    "/api/chat": "chat", "/api/generate": "generate", "/api/embed": "embed", "/api/embeddings": "embeddings",
    "/api/show": "show",
}
# Reads a backend's JSON answer to a GET of a path (None when it gives none): the session's, bounded in time.
Fetch = Callable[[Backend, str], Awaitable[Any]]


class OllamaAdapter:
    """One Ollama request's adapter; ``fetch`` reads llama.cpp's ``/props`` for ``/api/show``."""

    __slots__ = ("_exchanges", "_fetch", "_idle", "_route")

    def __init__(self, route: Route, idle_timeout: float, fetch: Fetch) -> None:
        self._route = route
        self._idle = idle_timeout
        self._fetch = fetch
        self._exchanges: dict[str, OllamaExchange] = {}

    def exchange(self, backend: Backend, body: InboundBody) -> OllamaExchange | None:
        family = family_of(backend)
        parsed = body.parsed
        if family == "ollama" or parsed is None:
            self._exchanges.pop(backend.name, None)
            return None
        props = None
        if self._route == "show" and family == "llamacpp":
            props = functools.partial(self._fetch, backend, "/props")
        exchange = OllamaExchange(self._plan(parsed, family, backend.name), self._idle, backend.name, props)
        self._exchanges[backend.name] = exchange
        return exchange

    def _plan(self, parsed: dict[str, object], family: Literal["llamacpp", "openai"], backend: str) -> Plan:
        route = self._route
        if route == "chat":
            return requests.chat(parsed, family, backend)
        if route == "generate":
            return requests.generate(parsed, family, backend)
        if route == "show":
            return requests.show(parsed)
        return requests.embed(parsed, "embed" if route == "embed" else "embeddings")

    def exchange_for(self, backend: Backend) -> OllamaExchange | None:
        return self._exchanges.get(backend.name)

    def error_response(self, error: ProxyError, request_id: str) -> web.Response:
        return from_proxy_error(error, request_id)
