"""``GET /v1/models``: the models of every routable backend, merged, in OpenAI's list format.

Each routable backend is asked for its own ``/v1/models`` at the time of the request (a backend's
list is what it says now); the models declared for it in config are added. Names appear once, and
``-2``/``-3`` instance aliases are hidden where their base is served: to clients they are one model. With
client keys configured, a key sees only the models its ``models`` patterns admit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.model_routing import client_names
from llmbalancer.web.keyed import requester

if TYPE_CHECKING:
    from llmbalancer.components import Components

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def fetch_json(components: Components, backend: Backend, path: str) -> Any | None:
    """GET ``path`` from ``backend``: its JSON, or None when it does not answer 200 with JSON in time."""
    session = components.proxy.session
    if session is None:
        return None
    timeout = aiohttp.ClientTimeout(total=components.config.timeouts.health)
    try:
        async with session.get(backend.url + path, timeout=timeout, headers=backend.auth_headers) as reply:
            if reply.status != 200:
                return None
            return await reply.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def gather_from_routable(components: Components, path: str) -> list[tuple[Backend, Any]]:
    """Every routable backend's answer to ``GET path`` (None where it gave none), in registry order."""
    backends = components.registry.routable()
    answers = await asyncio.gather(*(fetch_json(components, b, path) for b in backends))
    return list(zip(backends, answers, strict=True))


def _openai_entries(answer: Any) -> list[Mapping[str, Any]]:
    data = answer.get("data") if isinstance(answer, Mapping) else None
    if not isinstance(data, list):
        return []
    return [item for item in data if isinstance(item, Mapping) and isinstance(item.get("id"), str)]


async def merged_models(components: Components) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for backend, answer in await gather_from_routable(components, "/v1/models"):
        for name in backend.models:
            entries.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": backend.name})
        for item in _openai_entries(answer):
            entries.setdefault(str(item["id"]), dict(item))
    return [entries[name] for name in client_names(entries)]


def models_handler(components: Components) -> Handler:
    async def models(request: web.Request) -> web.Response:
        key = requester(components, request)
        listed = await merged_models(components)
        if key is not None:
            listed = [entry for entry in listed if key.allows_listed(str(entry["id"]))]
        return web.json_response({"object": "list", "data": listed})

    return models


def add_model_routes(app: web.Application, components: Components) -> None:
    app.router.add_get("/v1/models", models_handler(components))
