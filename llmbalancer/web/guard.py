"""What every request passes on its way to a handler, the proxy's included: the last line against an
answer that is not OpenAI-style JSON, and the request targets and versions no handler should see.

* A request target that is neither a path (origin form) nor an absolute URL (``OPTIONS *``,
  ``CONNECT host:443``) is 400; an absolute URL's path and query are what the proxy forwards.
* A request that made it past the parser labelled other than HTTP/1.x (pipelined behind another) is 400.
* A body aiohttp could not read (bad chunked framing, a Content-Encoding that does not decode) is 400.
* A ``ProxyError`` a handler lets out is answered as OpenAI-style JSON.
* Any other exception is a bug: one 500 ``internal_error`` carrying the request id, the traceback logged
  once under it, and a ``request`` access event with the status it got.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

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
    except web.HTTPException:
        raise
    except Exception:
        return _internal_error(request)


def _internal_error(request: web.Request) -> web.StreamResponse:
    access = Access(request_id(request), request.method, request.path, time.monotonic())
    response = answer_unexpected(request, access)
    access.emit()
    return response
