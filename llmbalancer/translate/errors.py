"""Errors in Ollama's shape, ``{"error": "message"}``: the balancer's own (same status as on the OpenAI
routes) and the backend's, passed on with its status and its message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from llmbalancer.errors import ProxyError

_MAX_MESSAGE = 2000


def ollama_error(status: int, message: str, request_id: str | None, retry_after: int | None = None) -> web.Response:
    headers = {"X-Request-ID": request_id} if request_id else {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json", headers=headers
    )


def from_proxy_error(error: ProxyError, request_id: str | None) -> web.Response:
    return ollama_error(error.status, error.message, request_id, error.retry_after)


def backend_message(data: bytes, status: int) -> str:
    """The message in a backend's error answer: OpenAI's ``error.message``, Ollama's ``error``, vLLM's
    ``message``, FastAPI's ``detail``, else its text (bounded), else the status."""
    try:
        parsed: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        text = data.decode("utf-8", "replace").strip()
        return text[:_MAX_MESSAGE] if text else f"HTTP {status}"
    message: Any = None
    if isinstance(parsed, Mapping):
        error = parsed.get("error")
        if isinstance(error, Mapping):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or parsed.get("message") or parsed.get("detail")
    if message is None:
        return f"HTTP {status}"
    text = message if isinstance(message, str) else orjson.dumps(message).decode()
    return text[:_MAX_MESSAGE]
