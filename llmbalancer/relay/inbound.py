"""What the client sent: the body (read whole on JSON API routes, streamed elsewhere) and its facts."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from llmbalancer import errors
from llmbalancer.scheduling.selectors import RequestFacts

# llama.cpp's native JSON routes; every /v1/* and Ollama /api/* route is JSON too.
_NATIVE_JSON_ROUTES = frozenset(
    {
        "/completion", "/completions", "/chat/completions", "/embedding", "/embeddings", "/infill",
        "/tokenize", "/detokenize", "/rerank", "/reranking", "/apply-template",
    }
)
# The routes the lean relay (front.py) takes: the generation and embedding routes, OpenAI's and llama.cpp's.
LEAN_PATHS = _NATIVE_JSON_ROUTES | {"/v1" + route for route in _NATIVE_JSON_ROUTES} | {"/v1/responses"}
_STREAMED_CONTENT_TYPES = ("multipart/", "application/octet-stream", "audio/", "image/")
_MAX_REQUEST_ID = 128
_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})  # aiohttp's HttpRequestParser, auto_decompress
_LONE_SURROGATE = "a string holds a lone UTF-16 surrogate"


def request_id(request: web.BaseRequest) -> str:
    """The client's ``X-Request-ID`` when it is a sane one, else a new one."""
    return choose_request_id(request.headers.get("X-Request-ID", ""))


def choose_request_id(given: str) -> str:
    """``given`` (a client's ``X-Request-ID``) when it is a sane one, else a new one."""
    if given and len(given) <= _MAX_REQUEST_ID and given.isprintable():
        return given
    # An identifier, not a secret: the Mersenne Twister's 128 bits, without secrets' urandom syscall.
    return f"{random.getrandbits(128):032x}"


def origin_form(request: web.Request) -> str:
    """The request target as a path and query, to append to a backend's URL. An absolute-form target
    (``GET http://host/slots``, RFC 9112 3.2.2) gives its path and query only: its host never picks one."""
    target = request.raw_path
    return target if target.startswith("/") else request.rel_url.raw_path_qs or "/"


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
    try:
        if declared and declared <= limit and not decoded_on_arrival(request.headers):
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
    except web.RequestPayloadError as exc:
        raise unreadable(exc) from exc
    except asyncio.IncompleteReadError:
        raise errors.unreadable_body("it ended before its Content-Length") from None


async def _stream_bounded(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            yield chunk
    except web.RequestPayloadError as exc:
        raise unreadable(exc) from exc


def decoded_on_arrival(headers: Mapping[str, str]) -> bool:
    """Whether aiohttp decodes this request's body as it reads it (its Content-Encoding is one aiohttp's
    parser decodes): the body read is then not the one sent, nor of its Content-Length."""
    encoding = headers.get("Content-Encoding")
    return encoding is not None and encoding.isascii() and encoding.lower() in _DECODED_ENCODINGS


def unreadable(exc: web.RequestPayloadError) -> errors.ProxyError:
    """aiohttp's error for a body its parser could not take (chunked framing, a Content-Encoding that does not
    decode), as the client's 400: the parser's own words, without its excerpt of the bytes."""
    cause = exc.__cause__
    text = cause.message if isinstance(cause, HttpProcessingError) else str(exc).removeprefix("400, message:")
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "malformed")
    return errors.unreadable_body(first.rstrip(": ."))


def parse_json_object(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise errors.invalid_json(f"not UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        reason = "empty body" if not data.strip() else f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise errors.invalid_json(reason) from exc
    except RecursionError:
        raise errors.invalid_json("nested too deeply") from None
    except ValueError as exc:  # int(): more digits than sys.get_int_max_str_digits(); NaN and Infinity
        raise errors.invalid_json(_number_reason(exc)) from None
    if not isinstance(parsed, dict):
        raise errors.not_json_object()
    return parsed


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _number_reason(exc: ValueError) -> str:
    text = str(exc)
    if "integer string conversion" in text:
        return "a number has too many digits"
    return text if len(text) <= 100 else "a number is not valid"


def encode_json(parsed: dict[str, Any]) -> bytes:
    """``parsed`` as JSON again, for a body the balancer edits. It came from ``parse_json_object``, but may
    still hold what cannot go out as UTF-8 JSON (a lone surrogate from ``"\\ud800"``; nesting that was just
    shallow enough to read): that is the client's mistake, a 400."""
    try:
        return json.dumps(parsed, ensure_ascii=False).encode()
    except RecursionError:
        raise errors.invalid_json("nested too deeply") from None
    except UnicodeEncodeError:
        raise errors.invalid_json(_LONE_SURROGATE) from None


def _check_utf8(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise errors.invalid_json(_LONE_SURROGATE) from None


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


def request_facts(request: web.Request, body: InboundBody) -> RequestFacts:
    return facts_of(request.method, request.path, client_address(request), request.headers, body.parsed)


def facts_of(
    method: str, path: str, client: str, headers: Mapping[str, str], parsed: dict[str, Any] | None
) -> RequestFacts:
    model = parsed.get("model") if parsed is not None else None
    if model is None and parsed is not None and path == "/api/show":
        model = parsed.get("name")  # Ollama's older field name, still accepted there
    if isinstance(model, str) and not model.isascii():
        _check_utf8(model)  # it goes on into logs, metric labels and prompt hashes, all UTF-8
    return RequestFacts(
        method=method, path=path, client=client, headers=headers, model=model if isinstance(model, str) else None,
        body=parsed,
    )



def with_model(body: InboundBody, name: str | None) -> InboundBody:
    """``body`` naming ``name`` as its model (re-encoded), or ``body`` itself when ``name`` is None."""
    if name is None or body.parsed is None:
        return body
    parsed: dict[str, Any] = {**body.parsed, "model": name}
    return InboundBody(encode_json(parsed), None, parsed)
