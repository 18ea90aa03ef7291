"""The fleet's admin routes: backends registered over the API, agents' heartbeats, the config reload.

- ``GET /admin/backends``: every backend, with its ``source`` (``config``, ``api``, ``agent``, ``dns``,
  ``instance``), as the snapshot describes it.
- ``POST /admin/backends`` ``{"url", "name"?, "kind"?, "models"?, "max_concurrency"?}``: 201 with the
  backend; the same body again 200; the same name with another URL (or held by another source) 409.
- ``DELETE /admin/backends/{name}``: 202, draining (gone once its in-flight requests finish); 404 unknown.
- ``PUT /admin/backends`` with the whole list (``[...]`` or ``{"backends": [...]}``): the ``api`` backends
  become exactly that list, in one step; the answer lists each change.
- ``PUT /admin/agents/{name}`` (a heartbeat, ``fleet/agents.py``) and ``DELETE /admin/agents/{name}``.
- ``POST /admin/reload``: re-read the configuration (``reloading.py``); 400 with every problem when invalid.

Bodies are validated whole before anything changes (pydantic models); a bad one is an OpenAI-style 400
naming the field. Each is guarded by ``web/admin.py``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from llmbalancer import errors
from llmbalancer.config import BackendConfig
from llmbalancer.config.validation import dotted, message
from llmbalancer.fleet.agents import Heartbeat
from llmbalancer.fleet.membership import Conflict, converge, register, spec_of
from llmbalancer.observe.snapshot import describe_backend

if TYPE_CHECKING:
    from llmbalancer.components import Components

Handler = Callable[[web.Request], Awaitable[web.Response]]
API = "api"
_MAX_NAME = 200
_Model = TypeVar("_Model", bound=BaseModel)


class _BadBody(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems

    def response(self, what: str) -> web.Response:
        return errors.invalid_request(f"Invalid {what}: {'; '.join(self.problems)}", "invalid_body").response()


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadBody([f"the body is not valid JSON ({exc})"]) from None


def _validated(model: type[_Model], data: Any, at: str = "") -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = dotted((*([at] if at else []), *error["loc"]))
            if error["type"] == "extra_forbidden":
                text = f"unknown field (known: {', '.join(model.model_fields)})"
            else:
                text = message(error, ())
            problems.append(f"{key}: {text}" if key else text)
        raise _BadBody(problems) from None


def _backend_config(data: Any, at: str = "") -> BackendConfig:
    if not isinstance(data, dict):
        raise _BadBody([f"{at or 'the body'}: must be a JSON object with at least `url`"])
    config = _validated(BackendConfig, data, at)
    problem = name_problem(config.name)
    if problem:
        raise _BadBody([f"{dotted((*([at] if at else []), 'name'))}: {problem}"])
    if config.api_key_env is not None:  # the balancer's environment is read at load only, never per request
        raise _BadBody([f"{dotted((*([at] if at else []), 'api_key_env'))}: send the key itself as api_key"])
    return config


def name_problem(name: str) -> str | None:
    if not name or len(name) > _MAX_NAME or not name.isprintable() or "/" in name:
        return f"must be 1 to {_MAX_NAME} printable characters without '/', got {name[:_MAX_NAME]!r}"
    return None


def _backends_list(data: Any) -> Sequence[BackendConfig]:
    items = data.get("backends") if isinstance(data, dict) and set(data) == {"backends"} else data
    if not isinstance(items, list):
        raise _BadBody(["the body must be a list of backends, or {\"backends\": [...]}"])
    configs: list[BackendConfig] = []
    problems: list[str] = []
    names: dict[str, int] = {}
    for index, item in enumerate(items):
        try:
            config = _backend_config(item, f"backends[{index}]")
        except _BadBody as bad:
            problems += bad.problems
            continue
        if config.name in names:
            first = names[config.name]
            problems.append(f"backends[{index}].name: duplicate name {config.name!r} (also backends[{first}])")
        names.setdefault(config.name, index)
        configs.append(config)
    if problems:
        raise _BadBody(problems)
    return configs


def add_fleet_routes(app: web.Application, components: Components, guard: Callable[[Handler], Handler]) -> None:
    registry = components.registry

    async def list_backends(request: web.Request) -> web.Response:
        return web.json_response({"backends": [describe_backend(b) for b in registry]})

    async def add_backend(request: web.Request) -> web.Response:
        try:
            config = _backend_config(await _json(request))
        except _BadBody as bad:
            return bad.response("backend")
        try:
            change = register(registry, spec_of(config), API, same_url=True)
        except Conflict as conflict:
            return errors.conflict(conflict.message).response()
        backend = registry.get(config.name)
        assert backend is not None
        status = 201 if change.action == "added" else 200
        return web.json_response({**change.describe(), "backend": describe_backend(backend)}, status=status)

    async def remove_backend(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        backend = registry.get(name)
        if backend is None:
            return errors.not_found(f"No backend named {name!r}").response()
        if backend.source == "instance":
            return errors.conflict(f"{name!r} is a supervised instance: POST /admin/instances/{name}/stop").response()
        registry.remove(name, "removed over the admin API")
        draining = registry.get(name) is backend
        return web.json_response({"action": "removed", "backend": name, "draining": draining}, status=202)

    async def replace_backends(request: web.Request) -> web.Response:
        try:
            configs = _backends_list(await _json(request))
        except _BadBody as bad:
            return bad.response("backend list")
        try:
            changes = converge(registry, API, [spec_of(c) for c in configs], reason="left out of PUT /admin/backends")
        except Conflict as conflict:
            return errors.conflict(conflict.message).response()
        return web.json_response({
            "changes": [change.describe() for change in changes],
            "backends": [describe_backend(b) for b in registry if b.source == API],
        })

    async def heartbeat(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            problem = name_problem(name)
            if problem:
                raise _BadBody([f"agent name: {problem}"])
            beat = _validated(Heartbeat, await _json(request))
        except _BadBody as bad:
            return bad.response("heartbeat")
        try:
            change = components.agents.heartbeat(name, beat)
        except Conflict as conflict:
            return errors.conflict(conflict.message).response()
        return web.json_response(change.describe(), status=201 if change.action == "added" else 200)

    async def deregister(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not components.agents.deregister(name):
            return errors.not_found(f"No agent named {name!r}").response()
        return web.json_response({"action": "removed", "backend": name}, status=202)

    async def reload(request: web.Request) -> web.Response:
        reloader = components.reloader
        if reloader is None:
            return errors.conflict("This balancer cannot reload its configuration").response()
        result = await reloader.reload()
        if not result.ok:
            problem = errors.invalid_request(f"Invalid configuration: {'; '.join(result.problems)}", "invalid_config")
            body = json.loads(problem.body())
            return web.json_response({**body, **result.describe()}, status=400)
        return web.json_response(result.describe())

    app.router.add_get("/admin/backends", guard(list_backends))
    app.router.add_post("/admin/backends", guard(add_backend))
    app.router.add_put("/admin/backends", guard(replace_backends))
    app.router.add_delete("/admin/backends/{name}", guard(remove_backend))
    app.router.add_put("/admin/agents/{name}", guard(heartbeat))
    app.router.add_delete("/admin/agents/{name}", guard(deregister))
    app.router.add_post("/admin/reload", guard(reload))
