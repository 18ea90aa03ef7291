"""Ollama's own API, so Ollama clients (``ollama`` CLI and Python client, Open WebUI) see one Ollama.

The balancer answers what describes the fleet as a whole: ``GET /`` (``Ollama is running``; a
browser asking for HTML still gets the backend's web UI), ``GET /api/version``, and ``GET
/api/tags`` / ``GET /api/ps`` merged across the routable backends that answer them. ``/api/show``,
``/api/chat``, ``/api/generate`` and ``/api/embed`` are ordinary proxied requests, routed by model
(model_routing.py; ``/api/show``'s older ``name`` field names the model too); their NDJSON streams pass
through unbuffered like any other body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmbalancer import __version__
from llmbalancer.scheduling.model_routing import client_names
from llmbalancer.web.models import Handler, gather_from_routable

if TYPE_CHECKING:
    from llmbalancer.components import Components


def _model_name(entry: Mapping[str, Any]) -> str | None:
    name = entry.get("model") or entry.get("name")
    return name if isinstance(name, str) else None


def merge_ollama_lists(answers: list[Any]) -> list[dict[str, Any]]:
    """The ``models`` of every answer, each name once (first backend's entry), aliases hidden."""
    entries: dict[str, dict[str, Any]] = {}
    for answer in answers:
        models = answer.get("models") if isinstance(answer, Mapping) else None
        for entry in models if isinstance(models, list) else []:
            if isinstance(entry, Mapping) and (name := _model_name(entry)) is not None:
                entries.setdefault(name, dict(entry))
    return [entries[name] for name in client_names(entries)]


def merged_list_handler(components: Components, path: str) -> Handler:
    async def merged(request: web.Request) -> web.Response:
        answers = [answer for _, answer in await gather_from_routable(components, path)]
        return web.json_response({"models": merge_ollama_lists(answers)})

    return merged


def version_handler(components: Components) -> Handler:
    async def version(request: web.Request) -> web.Response:
        for _, answer in await gather_from_routable(components, "/api/version"):
            if isinstance(answer, Mapping) and isinstance(answer.get("version"), str):
                return web.json_response({"version": answer["version"]})
        return web.json_response({"version": __version__})

    return version


def root_handler(components: Components) -> Handler:
    async def root(request: web.Request) -> web.StreamResponse:
        if "text/html" in request.headers.get("Accept", ""):
            return await components.proxy.handle(request)  # a browser: llama.cpp's web UI
        return web.Response(text="Ollama is running")

    return root


def add_ollama_routes(app: web.Application, components: Components) -> None:
    app.router.add_get("/", root_handler(components))
    app.router.add_get("/api/version", version_handler(components))
    app.router.add_get("/api/tags", merged_list_handler(components, "/api/tags"))
    app.router.add_get("/api/ps", merged_list_handler(components, "/api/ps"))
