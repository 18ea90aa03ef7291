"""The access record: one per request, filled in as the request goes, emitted once as the ``request`` log
event and handed to the observers (metrics, the monitor's recent requests)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import overload

import structlog
from aiohttp import web

from llmbalancer import errors
from llmbalancer.auth.limits import LimitHeaders
from llmbalancer.fleet.usage import Tail, Usage, read_usage

log = structlog.get_logger("llmbalancer.access")

# Model names, paths and errors come from clients and backends: what is logged or kept of them is bounded.
MAX_TEXT = 200


@overload
def clip(text: str, limit: int = MAX_TEXT) -> str: ...
@overload
def clip(text: None, limit: int = MAX_TEXT) -> None: ...
def clip(text: str | None, limit: int = MAX_TEXT) -> str | None:
    """``text`` cut to at most ``limit`` characters, ending with an ellipsis and its full length; else itself."""
    if text is None or len(text) <= limit:
        return text
    tail = f"\u2026 ({len(text)} chars)"
    return text[: max(0, limit - len(tail))] + tail


@dataclass(slots=True)
class Access:
    """The one access-log event of a request, filled in as it goes."""

    request_id: str
    method: str
    path: str
    started: float
    model: str | None = None
    backend: str | None = None
    status: int = 0
    attempts: int = 0
    ttfb: float | None = None
    bytes: int = 0
    error: str | None = None
    # Token counts when the backend reported them (filled by the usage reader).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finished: float = 0.0
    queue_wait: float | None = None  # seconds the first claim waited (admission queue), when it got one
    usage_tail: Tail = b""
    usage_head: Tail = b""  # a stream's first chunk (where Anthropic's Messages API puts the prompt's counts)
    # Why each failed attempt before the last failed ("backend: reason"), when any did.
    attempt_errors: list[str] | None = None  # the response's last chunks, for the usage reader (dispatcher.completed)
    key_name: str | None = None  # the client key's name (auth/), never the key itself
    limit_headers: LimitHeaders | None = None  # the key's x-ratelimit-* headers, on whatever answer it gets

    def emit(self) -> None:
        now = self.finished = time.monotonic()
        self.usage_head = b""  # read by now, if at all; the monitor's ring keeps this record
        log.info(
            "request",
            request_id=self.request_id,
            method=self.method,
            path=clip(self.path),
            model=clip(self.model),
            backend=self.backend,
            status=self.status,
            attempts=self.attempts,
            queue_ms=None if self.queue_wait is None else round(self.queue_wait * 1000, 2),
            ttfb_ms=None if self.ttfb is None else round((self.ttfb - self.started) * 1000, 2),
            duration_ms=round((now - self.started) * 1000, 2),
            bytes=self.bytes,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            error=clip(self.error),
            attempt_errors=self.attempt_errors,
            key=self.key_name,
        )

    def attempt_failed(self, reason: str) -> None:
        if self.attempt_errors is None:
            self.attempt_errors = []
        self.attempt_errors.append(reason)

    def tokens_used(self) -> int | None:
        """For the key's ``tpm``: the tokens the response reported (prompt + completion); 0 when nothing was
        served (no answer, or an error status); None when an answer came without counts."""
        if self.prompt_tokens is not None or self.completion_tokens is not None:
            return (self.prompt_tokens or 0) + (self.completion_tokens or 0)
        return None if 200 <= self.status < 400 else 0

    def read_usage(self) -> Usage | None:
        """The token counts at the response's tail, copied into this record (the tail is then dropped)."""
        usage = read_usage(self.usage_tail, self.usage_head) if self.usage_tail else None
        self.usage_tail = self.usage_head = b""
        if usage is not None:
            self.prompt_tokens = usage.prompt_tokens
            self.completion_tokens = usage.completion_tokens
            self.cached_tokens = usage.cached_tokens
        return usage


# A proxied request's record, on aiohttp's request: every answer it gets carries its key's rate-limit headers.
ACCESS = web.RequestKey("access", Access)


async def add_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's ``on_response_prepare``: a keyed request's answer, whichever part of the balancer wrote it (the
    relay, the Ollama translation, an error), carries its key's ``x-ratelimit-*`` headers, in place of any
    the backend sent."""
    access = request.get(ACCESS)
    if access is not None and access.limit_headers:
        headers = response.headers
        for name, value in access.limit_headers.pairs():
            headers[name] = value


def answer_unexpected(request: web.BaseRequest, access: Access) -> web.Response:
    """The last line against a bug, called in its ``except`` block: the traceback logged once under the
    request id, ``access`` given the status the client gets, and that answer: a 500 ``internal_error``, or,
    when the response had started, a cut connection (the 500 is then never sent)."""
    log.exception("unhandled_error", request_id=access.request_id, method=access.method, path=access.path)
    error = errors.internal_error()
    access.error = error.code
    if request.writer.output_size > 0:
        if request.transport is not None:
            request.transport.close()
    else:
        access.status = error.status
    return error.response(access.request_id)
