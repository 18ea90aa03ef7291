"""``GET /llmhealth-snapshot``: the snapshot (``llmbalancer.observe.snapshot``) as JSON, never cached."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


def snapshot_handler(snapshot: Callable[[], dict[str, Any]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response(snapshot(), headers={"Cache-Control": "no-store"})

    return handle
