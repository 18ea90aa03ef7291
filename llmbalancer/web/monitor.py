"""``GET /llmhealth-monitor``: the live monitor, one self-contained page polling the snapshot.

The page (``monitor.html`` beside this file) loads nothing from elsewhere, so it works offline;
the Content-Security-Policy holds it to that, and to talking only to this balancer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


def monitor_page() -> str:
    return resources.files("llmbalancer.web").joinpath("monitor.html").read_text(encoding="utf-8")


def monitor_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    page = monitor_page()  # read once, at start-up

    async def monitor(request: web.Request) -> web.Response:
        return web.Response(
            text=page,
            content_type="text/html",
            headers={
                "Content-Security-Policy": _CSP,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    return monitor
