"""Ollama's own API, so Ollama clients (``ollama`` CLI and Python client, Open WebUI) see one Ollama.

The balancer answers what describes the fleet as a whole: ``GET /`` (``Ollama is running``; a
browser asking for HTML still gets the backend's web UI), ``GET /api/version``, and ``GET
/api/tags`` / ``GET /api/ps`` merged across the routable backends that answer them. ``POST
/api/show`` goes to the backends that may serve the model, in turn, until one answers 200.
``/api/chat``, ``/api/generate`` and ``/api/embed`` are ordinary proxied requests, routed by model
(model_routing.py); their NDJSON streams pass through unbuffered like any other body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from llmbalancer import __version__, errors
from llmbalancer.errors import ProxyError
from llmbalancer.relay.inbound import read_body, request_facts, with_model
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


def show_handler(components: Components) -> Handler:
    async def show(request: web.Request) -> web.StreamResponse:
        try:
            return await _show(components, request)
        except ProxyError as error:
            return error.response()

    return show


async def _show(components: Components, request: web.Request) -> web.StreamResponse:
    body = await read_body(request, components.config.server.max_body_bytes)
    facts = request_facts(request, body)
    router = components.dispatcher.routing
    model = facts.model
    if model is None and body.parsed is not None and isinstance(body.parsed.get("name"), str):
        model = body.parsed["name"]  # the older field name, still accepted by Ollama
    if model is None:
        raise errors.ProxyError(400, "The request names no model", "invalid_request_error", "missing_model")
    registry = components.registry
    eligible = router.eligible(model, registry)
    if not eligible:
        served = client_names(n for b in registry for n in (*b.models, *b.health.served_models))
        raise errors.model_not_found(model, served)
    session = components.proxy.session
    assert session is not None
    timeout = aiohttp.ClientTimeout(total=components.config.timeouts.first_byte)
    last: tuple[int, bytes, str] | None = None
    for backend in (b for b in eligible if b.routable):
        payload = with_model(body, router.rename_for(facts, backend)).data
        try:
            async with session.post(
                backend.url + "/api/show", data=payload, headers={"Content-Type": "application/json"},
                timeout=timeout,
            ) as reply:
                last = (reply.status, await reply.read(), reply.content_type)
        except (aiohttp.ClientError, TimeoutError):
            continue
        if last[0] == 200:
            break
    if last is None:
        raise errors.no_backend("No backend that may serve this model answered")
    status, data, content_type = last
    return web.Response(status=status, body=data, content_type=content_type)


def add_ollama_routes(app: web.Application, components: Components) -> None:
    app.router.add_get("/", root_handler(components))
    app.router.add_get("/api/version", version_handler(components))
    app.router.add_get("/api/tags", merged_list_handler(components, "/api/tags"))
    app.router.add_get("/api/ps", merged_list_handler(components, "/api/ps"))
    app.router.add_post("/api/show", show_handler(components))
