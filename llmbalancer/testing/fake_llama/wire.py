"""Bytes on the wire that every endpoint shares: compact JSON, llama-server's constant bodies and headers,
API errors as values, and the few things a handler asks of its connection (alive? abort it).

The shapes are those of docs/llama-server-api.md ("Startup and health", "GET /slots", errors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

BUILD_INFO = "b1-0c1e570"
JSON_CT = "application/json; charset=utf-8"


def dumps(obj: Any) -> bytes:
    """JSON as llama-server writes it: no spaces, UTF-8 as is."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


LOADING_BODY = dumps({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
NOT_FOUND_BODY = dumps({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}})
NO_SLOTS_ENDPOINT_BODY = dumps({"error": {
    "code": 501, "message": "This server does not support slots endpoint. Start it with `--slots`",
    "type": "not_supported_error",
}})
NO_SLOT_BODY = dumps({"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}})
HEALTH_OK_BODY = b'{"status":"ok"}'
SSE_HEADERS: Mapping[str, str] = {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An HTTP error with a llama-style JSON body; raised by parsing, answered by the middleware."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def api_error(status: int, message: str, kind: str, **extra: Any) -> ApiError:
    return ApiError(status, dumps({"error": {"code": status, "message": message, "type": kind, **extra}}))


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers={"Content-Type": JSON_CT})


def check_alive(request: web.BaseRequest) -> None:
    """Raise ConnectionResetError when the client has gone away."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client disconnected")


def abort(request: web.BaseRequest) -> None:
    """Drop the TCP connection at once (a crash, as the client sees it)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
