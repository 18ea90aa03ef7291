"""Ollama's own API, so Ollama clients (``ollama`` CLI and Python client, Open WebUI) see one Ollama made of
the whole fleet, whatever its backends speak.

The balancer answers what describes the fleet as a whole: ``GET /`` (``Ollama is running``; a browser
asking for HTML still gets the backend's web UI), ``GET /api/version`` (the balancer's), and ``GET
/api/tags`` / ``GET /api/ps`` merged across the routable backends: an Ollama backend's own list, and the
models of every other backend described in Ollama's shape (``translate/catalog.py``). ``/api/chat``,
``/api/generate``, ``/api/embed``, ``/api/embeddings`` and ``/api/show`` are proxied requests, routed by
model (``/api/show``'s older ``name`` field names the model too), with the Ollama adapter
(``translate/adapter.py``): forwarded as they are to a backend that speaks Ollama (their NDJSON streams
pass through unbuffered), translated for any other; errors the balancer answers itself are Ollama's
``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmbalancer import __version__
from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.model_routing import client_names
from llmbalancer.translate.adapter import ROUTES, OllamaAdapter, Route
from llmbalancer.translate.catalog import model_facts, ps_entry, tag_entry
from llmbalancer.translate.kinds import speaks_ollama
from llmbalancer.web.keyed import requester
from llmbalancer.web.models import Handler, fetch_json

if TYPE_CHECKING:
    from llmbalancer.components import Components


def _model_name(entry: Mapping[str, Any]) -> str | None:
    name = entry.get("model") or entry.get("name")
    return name if isinstance(name, str) else None


def merge_ollama_lists(answers: list[Any]) -> list[dict[str, Any]]:
    """The ``models`` of every answer, each model once (the first backend's entry; ``x`` and ``x:latest``
    are one model), aliases hidden."""
    entries: dict[str, dict[str, Any]] = {}
    for answer in answers:
        models = answer.get("models") if isinstance(answer, Mapping) else None
        for entry in models if isinstance(models, list) else []:
            if isinstance(entry, Mapping) and (name := _model_name(entry)) is not None:
                entries.setdefault(name.removesuffix(":latest"), dict(entry))
    return [entries[name] for name in client_names(entries)]


async def _listed(components: Components, backend: Backend, path: str) -> Any:
    """``backend``'s answer to Ollama's ``path``: its own, or its models described in Ollama's shape."""
    if speaks_ollama(backend):
        return await fetch_json(components, backend, path)
    describe = ps_entry if path == "/api/ps" else tag_entry
    answer = await fetch_json(components, backend, "/v1/models")
    return {"models": [describe(facts) for facts in model_facts(answer, declared=backend.models)]}


def merged_list_handler(components: Components, path: str) -> Handler:
    async def merged(request: web.Request) -> web.Response:
        key = requester(components, request)
        backends = components.registry.routable()
        answers = await asyncio.gather(*(_listed(components, backend, path) for backend in backends))
        listed = merge_ollama_lists(answers)
        if key is not None:  # a client key sees its own models only
            listed = [entry for entry in listed if key.allows_listed(_model_name(entry) or "")]
        return web.json_response({"models": listed})

    return merged


def version_handler() -> Handler:
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": __version__, "server": "llmbalancer"})

    return version


def root_handler(components: Components) -> Handler:
    async def root(request: web.Request) -> web.StreamResponse:
        if "text/html" in request.headers.get("Accept", ""):
            return await components.proxy.handle(request)  # a browser: llama.cpp's web UI
        return web.Response(text="Ollama is running")

    return root


def adapted_handler(components: Components, route: Route) -> Handler:
    idle = components.config.timeouts.idle

    async def fetch(backend: Backend, path: str) -> Any:
        return await fetch_json(components, backend, path)

    async def adapted(request: web.Request) -> web.StreamResponse:
        return await components.proxy.handle(request, OllamaAdapter(route, idle, fetch))

    return adapted


def add_ollama_routes(app: web.Application, components: Components) -> None:
    app.router.add_get("/", root_handler(components))
    app.router.add_get("/api/version", version_handler())
    app.router.add_get("/api/tags", merged_list_handler(components, "/api/tags"))
    app.router.add_get("/api/ps", merged_list_handler(components, "/api/ps"))
    for path, route in ROUTES.items():
        app.router.add_post(path, adapted_handler(components, route))
