"""What the client sent: the body (read whole on JSON API routes, streamed elsewhere) and its facts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from llmbalancer import errors
from llmbalancer.scheduling.selectors import RequestFacts

# llama.cpp's native JSON routes; every /v1/* and Ollama /api/* route is JSON too.
_NATIVE_JSON_ROUTES = frozenset(
    {
        "/completion", "/completions", "/chat/completions", "/embedding", "/embeddings", "/infill",
        "/tokenize", "/detokenize", "/rerank", "/reranking", "/apply-template",
    }
)
_STREAMED_CONTENT_TYPES = ("multipart/", "application/octet-stream", "audio/", "image/")


def is_json_api_route(method: str, path: str, content_type: str) -> bool:
    if method != "POST" or content_type.startswith("multipart/"):
        return False
    if path.removeprefix("/v1") in _NATIVE_JSON_ROUTES:
        # Always JSON to the backend, whatever the client labelled it (aiohttp and requests label raw
        # bytes application/octet-stream); judging by the label let invalid JSON through to a 500.
        return True
    return path.startswith(("/v1/", "/api/")) and not content_type.startswith(_STREAMED_CONTENT_TYPES)


@dataclass(slots=True)
class InboundBody:
    """Either whole bytes (replayable, may be edited) or a one-shot stream."""

    data: bytes | None
    stream: AsyncIterator[bytes] | None
    parsed: dict[str, Any] | None

    @property
    def replayable(self) -> bool:
        return self.stream is None


async def read_body(request: web.Request, limit: int) -> InboundBody:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise errors.body_too_large(limit)
    # The raw header: aiohttp's request.content_type reports application/octet-stream when it is absent.
    if is_json_api_route(request.method, request.path, request.headers.get("Content-Type", "").lower()):
        data = await _read_bounded(request, limit)
        return InboundBody(data, None, parse_json_object(data))
    if not request.body_exists:
        return InboundBody(b"", None, None)
    if declared is not None and declared <= 64 * 1024:
        # Small bodies are read whole so that a failed attempt can be replayed elsewhere.
        return InboundBody(await _read_bounded(request, limit), None, None)
    return InboundBody(None, _stream_bounded(request, limit), None)


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    declared = request.content_length
    if declared and declared <= limit:
        # The usual case, a declared length: one read instead of an async iterator's two.
        return await request.content.readexactly(declared)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise errors.body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream_bounded(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise errors.body_too_large(limit)
        yield chunk


def parse_json_object(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except UnicodeDecodeError as exc:
        raise errors.invalid_json(f"not UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        reason = "empty body" if not data.strip() else f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise errors.invalid_json(reason) from exc
    if not isinstance(parsed, dict):
        raise errors.not_json_object()
    return parsed


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


def request_facts(request: web.Request, body: InboundBody) -> RequestFacts:
    parsed = body.parsed
    model = parsed.get("model") if parsed is not None else None
    if model is None and parsed is not None and request.path == "/api/show":
        model = parsed.get("name")  # Ollama's older field name, still accepted there
    return RequestFacts(
        method=request.method,
        path=request.path,
        client=client_address(request),
        headers=request.headers,
        model=model if isinstance(model, str) else None,
        body=parsed,
    )



def with_model(body: InboundBody, name: str | None) -> InboundBody:
    """``body`` naming ``name`` as its model (re-encoded), or ``body`` itself when ``name`` is None."""
    if name is None or body.parsed is None:
        return body
    parsed: dict[str, Any] = {**body.parsed, "model": name}
    return InboundBody(json.dumps(parsed, ensure_ascii=False).encode(), None, parsed)
