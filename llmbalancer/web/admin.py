"""Admin routes for supervised instances: list them; restart, stop or start one (draining it first).

``GET /admin/instances`` and ``POST /admin/instances/{name}/{restart|stop|start}``. Until the
security issue decides who may call admin routes, they answer loopback clients only (the peer
address of the connection; forwarded headers do not count).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from llmbalancer import errors
from llmbalancer.supervisor.instances import Instance, Supervisor

ACTIONS = ("restart", "stop", "start")


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _loopback_only(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.Response:
        if not is_loopback(request.remote):
            return errors.forbidden("Admin routes answer loopback clients only").response()
        return await handler(request)

    return guarded


def add_admin_routes(app: web.Application, supervisor: Supervisor | None) -> None:
    instances: dict[str, Instance] = supervisor.instances if supervisor else {}

    async def list_instances(request: web.Request) -> web.Response:
        return web.json_response({"instances": supervisor.describe() if supervisor else []})

    async def act(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if supervisor is None or name not in instances:
            return errors.not_found(f"No supervised instance named {name!r}").response()
        if action not in ACTIONS:
            return errors.not_found(f"Unknown action {action!r} (known: {', '.join(ACTIONS)})").response()
        operation = {"restart": supervisor.restart, "stop": supervisor.stop, "start": supervisor.start}[action]
        instance = await operation(name)
        return web.json_response({"action": action, "instance": instance.describe()})

    app.router.add_get("/admin/instances", _loopback_only(list_instances))
    app.router.add_post("/admin/instances/{name}/{action}", _loopback_only(act))
