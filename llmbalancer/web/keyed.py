"""The balancer's own routes when client keys are configured (``auth/``): the model lists and the Files and
Batches API answer a key's requests only (401 otherwise), and show it only its own; ``/metrics`` and the
snapshot (what the monitor reads) need the admin token or a key with ``observe: true``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from llmbalancer.auth.keys import ApiKey
from llmbalancer.auth.rules import observer_refusal

if TYPE_CHECKING:
    from llmbalancer.components import Components

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requester(components: Components, request: web.Request) -> ApiKey | None:
    """The key ``request`` presents (``ProxyError`` 401 without a known one); None when keys are not configured."""
    gate = components.proxy.keys
    return gate.authenticate(request.headers) if gate.active else None


def observed(components: Components, handler: Handler) -> Handler:
    """``handler`` answering only those who may observe the balancer."""

    async def checked(request: web.Request) -> web.StreamResponse:
        token = components.config.admin.token
        refused = observer_refusal(
            request.headers, None if token is None else token.get_secret_value(), components.proxy.keys.table
        )
        if refused is not None:
            return refused.response()
        return await handler(request)

    return checked
