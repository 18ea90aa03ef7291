"""``GET /health``: is this balancer able to serve? 200 while any backend is routable, else 503."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from llmbalancer.fleet.registry import Registry


def health_handler(registry: Registry) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def health(request: web.Request) -> web.Response:
        states = Counter(backend.state.value for backend in registry)
        healthy = sum(1 for backend in registry if backend.routable)
        body = {
            "status": "ok" if healthy else "unavailable",
            "backends_healthy": healthy,
            "backends_total": len(registry),
            "states": dict(states),
            "backends": [
                {"name": b.name, "url": b.url, "state": b.state.value, "in_flight": b.traffic.in_flight}
                for b in registry
            ],
        }
        return web.json_response(body, status=200 if healthy else 503)

    return health
