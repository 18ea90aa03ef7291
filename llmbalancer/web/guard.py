"""What every request passes on its way to a handler, the proxy's included: the last line against an
answer that is not OpenAI-style JSON, and the request targets and versions no handler should see.

* A request target that is neither a path (origin form) nor an absolute URL (``OPTIONS *``,
  ``CONNECT host:443``) is 400; an absolute URL's path and query are what the proxy forwards.
* A request that made it past the parser labelled other than HTTP/1.x (pipelined behind another) is 400.
* A body aiohttp could not read (bad chunked framing, a Content-Encoding that does not decode) is 400.
* aiohttp's own 404 and 405 (a path of the balancer's own with a method it does not answer) become
  OpenAI-style JSON, ``Allow`` kept; so does a ``ProxyError`` a handler lets out.
* Any other exception is a bug: one 500 ``internal_error`` carrying the request id, the traceback logged
  once under it, and a ``request`` access event with the status it got.

``expect_handler``: ``Expect: 100-continue`` invites the upload only when the declared body is within
``server.max_body_bytes``; over it, no ``100 Continue`` is sent and the handler answers 413.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, web

from llmbalancer import errors
from llmbalancer.errors import ProxyError
from llmbalancer.relay.access import Access, answer_unexpected
from llmbalancer.relay.inbound import request_id, unreadable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.version.major != 1:
        return errors.unsupported_http_version(f"HTTP/{request.version.major}.{request.version.minor}").response()
    target = request.raw_path
    if not target.startswith("/") and "://" not in target:
        return errors.invalid_request_target(target).response()
    try:
        return await handler(request)
    except ProxyError as error:
        return error.response(request_id(request))
    except web.RequestPayloadError as exc:  # a body read by a handler other than the proxy's
        return unreadable(exc).response(request_id(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_of(request, exc)
    except Exception:
        return _internal_error(request)


def _json_of(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status == 404:
        error = errors.not_found(f"No route for {request.method} {request.path}")
    elif exc.status == 405:
        error = errors.method_not_allowed(request.method, request.path, exc.headers.get("Allow", "none"))
    else:
        code = exc.reason.lower().replace(" ", "_").replace("-", "_")
        error = ProxyError(exc.status, exc.text or exc.reason, "invalid_request_error", code)
    response = error.response(request_id(request))
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def _internal_error(request: web.Request) -> web.StreamResponse:
    access = Access(request_id(request), request.method, request.path, time.monotonic())
    response = answer_unexpected(request, access)
    access.emit()
    return response


def expect_handler(limit: int) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None
        value = request.headers.get("Expect", "")
        if value.lower() != "100-continue":
            return errors.expectation_failed(value).response(request_id(request))
        declared = request.content_length
        if declared is not None and declared > limit:
            return None  # no invitation: the handler answers 413 before reading a byte of it
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own: the response proper has not started
        return None

    return expect
