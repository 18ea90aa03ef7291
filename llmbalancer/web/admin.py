"""Admin routes (``/admin/*``) and who may call them; the instance routes.

Who: with ``admin.token`` set, every admin route requires ``Authorization: Bearer <token>``, from any
address, loopback included (compared in constant time; the token is never logged): 401 otherwise. Without
a token, only loopback peers are answered (the connection's peer address; forwarded headers do not
count), and not a request that came through a proxy (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``):
403 otherwise (``auth/rules.py``). The token is read per request, so a reload that sets or changes it
applies at once.

Supervised instances: ``GET /admin/instances`` and ``POST /admin/instances/{name}/{restart|stop|start}``.
The fleet's routes (backends, agents, reload) are in ``web/admin_fleet.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from llmbalancer import errors
from llmbalancer.auth.rules import admin_refusal, is_loopback

if TYPE_CHECKING:
    from llmbalancer.components import Components

ACTIONS = ("restart", "stop", "start")
__all__ = ["add_admin_routes", "guarded", "is_loopback", "refusal"]


Handler = Callable[[web.Request], Awaitable[web.Response]]


def refusal(request: web.Request, token: str | None) -> errors.ProxyError | None:
    """Why ``request`` may not call an admin route, or None when it may (``auth/rules.py``)."""
    return admin_refusal(request.remote, request.headers, token)


def guarded(components: Components) -> Callable[[Handler], Handler]:
    def guard(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.Response:
            secret = components.config.admin.token
            refused = refusal(request, None if secret is None else secret.get_secret_value())
            if refused is not None:
                return refused.response()
            return await handler(request)

        return checked

    return guard


def add_admin_routes(app: web.Application, components: Components) -> None:
    from llmbalancer.web.admin_fleet import add_fleet_routes

    guard = guarded(components)
    supervisor = components.supervisor

    async def list_instances(request: web.Request) -> web.Response:
        return web.json_response({"instances": supervisor.describe() if supervisor else []})

    async def act(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if supervisor is None or name not in supervisor.instances:
            return errors.not_found(f"No supervised instance named {name!r}").response()
        if action not in ACTIONS:
            return errors.not_found(f"Unknown action {action!r} (known: {', '.join(ACTIONS)})").response()
        operation = {"restart": supervisor.restart, "stop": supervisor.stop, "start": supervisor.start}[action]
        instance = await operation(name)
        return web.json_response({"action": action, "instance": instance.describe()})

    app.router.add_get("/admin/instances", guard(list_instances))
    app.router.add_post("/admin/instances/{name}/{action}", guard(act))
    add_fleet_routes(app, components, guard)
