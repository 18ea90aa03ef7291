"""Every error the balancer answers itself: one OpenAI-style shape, statuses decided here only."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class ProxyError(Exception):
    """A request the balancer answers itself instead of a backend's response."""

    status: int
    message: str
    type: str
    code: str
    retry_after: int | None = None

    def response(self, request_id: str | None = None) -> web.Response:
        headers = {"X-Request-ID": request_id} if request_id else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return web.Response(
            status=self.status, body=self.body(), content_type="application/json", headers=headers
        )

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "code": self.code}}).encode()

    def sse_event(self) -> bytes:
        """The same error as an SSE event, for a stream that already started (the OpenAI SDK raises it)."""
        return b"event: error\ndata: " + self.body() + b"\n\n"


def invalid_json(reason: str) -> ProxyError:
    return ProxyError(400, f"Request body is not valid JSON: {reason}", "invalid_request_error", "invalid_json")


def not_json_object() -> ProxyError:
    return ProxyError(400, "Request body must be a JSON object", "invalid_request_error", "invalid_json")


def bad_request(reason: str) -> ProxyError:
    """A request aiohttp's HTTP parser refused (a malformed head, conflicting lengths, ...)."""
    return ProxyError(400, f"Malformed HTTP request: {reason}", "invalid_request_error", "bad_request")


def unreadable_body(reason: str) -> ProxyError:
    """A body that broke off or could not be decoded on its way in (bad chunked framing, bad gzip)."""
    return ProxyError(400, f"The request body could not be read: {reason}", "invalid_request_error", "invalid_body")


def unsupported_http_version(version: str) -> ProxyError:
    return ProxyError(
        400, f"Only HTTP/1.0 and HTTP/1.1 are served, not {version}", "invalid_request_error",
        "unsupported_http_version",
    )


def invalid_request_target(target: str) -> ProxyError:
    shown = target if len(target) <= 100 else target[:97] + "..."
    return ProxyError(
        400, f"The request target {shown!r} is not a path (origin form) or an absolute URL",
        "invalid_request_error", "invalid_request_target",
    )


def request_timeout(message: str) -> ProxyError:
    return ProxyError(408, message, "invalid_request_error", "request_timeout")


def method_not_allowed(method: str, path: str, allowed: str) -> ProxyError:
    return ProxyError(
        405, f"{path} does not answer {method} (it answers {allowed})", "invalid_request_error", "method_not_allowed"
    )


def expectation_failed(expect: str) -> ProxyError:
    return ProxyError(
        417, f"Unsupported Expect header {expect[:100]!r} (only 100-continue)", "invalid_request_error",
        "expectation_failed",
    )


def internal_error() -> ProxyError:
    """The last line: an exception nobody expected. The traceback is in the log, under the request id."""
    return ProxyError(
        500, "The balancer failed to handle this request; its log has the details under this request's "
        "X-Request-ID", "server_error", "internal_error",
    )


def body_too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, f"Request body exceeds the limit of {limit} bytes", "invalid_request_error", "request_too_large"
    )


def no_backend(reason: str = "No backend is available to serve this request") -> ProxyError:
    return ProxyError(503, reason, "service_unavailable", "no_backend_available", retry_after=1)


def queue_full(depth: int, expected_wait: float | None = None, timeout: float | None = None) -> ProxyError:
    """Refused at the queue: it is at its size cap, or (``timeout`` given) the expected wait exceeds it.
    ``Retry-After`` is the expected wait (whole seconds, at least 1) when one is known."""
    retry_after = 1 if expected_wait is None else max(1, math.ceil(expected_wait))
    if timeout is None:
        message = f"All backends are busy and the queue is full ({depth} waiting)"
    else:
        message = (
            f"All backends are busy: the expected wait ({expected_wait:.0f} s, {depth} waiting) exceeds the "
            f"queue timeout ({timeout:g} s)"
        )
    return ProxyError(503, message, "service_unavailable", "queue_full", retry_after=retry_after)


def queue_timeout(waited: float) -> ProxyError:
    return ProxyError(
        504, f"No backend slot freed within {waited:g} s", "timeout_error", "queue_timeout"
    )


def upstream_unreachable(attempts: int, last_error: str) -> ProxyError:
    return ProxyError(
        502, f"All {attempts} attempt(s) to reach a backend failed; last error: {last_error}",
        "bad_gateway", "upstream_unreachable",
    )


def upstream_timeout(what: str, seconds: float) -> ProxyError:
    return ProxyError(504, f"Backend timed out: no {what} within {seconds:g} s", "timeout_error", "upstream_timeout")


def upstream_protocol_error(what: str) -> ProxyError:
    return ProxyError(502, f"The backend answered {what}", "bad_gateway", "upstream_protocol_error")


def upstream_failed_mid_stream(reason: str) -> ProxyError:
    return ProxyError(
        502, f"Backend failed after the response started: {reason}", "server_error", "upstream_stream_broken"
    )


def not_found(message: str) -> ProxyError:
    return ProxyError(404, message, "invalid_request_error", "not_found")


def forbidden(message: str) -> ProxyError:
    return ProxyError(403, message, "permission_error", "forbidden")


def model_not_found(model: str, available: list[str]) -> ProxyError:
    served = ", ".join(available) if available else "none"
    return ProxyError(
        404, f"The model '{model}' is not served by any backend; available models: {served}",
        "invalid_request_error", "model_not_found",
    )


def unauthorized(message: str) -> ProxyError:
    return ProxyError(401, message, "authentication_error", "invalid_admin_token")


def invalid_request(message: str, code: str = "invalid_request") -> ProxyError:
    """A well-formed request whose content is wrong (an admin body naming a bad field, an invalid config)."""
    return ProxyError(400, message, "invalid_request_error", code)


def conflict(message: str) -> ProxyError:
    return ProxyError(409, message, "invalid_request_error", "conflict")


def invalid_api_key(presented: bool) -> ProxyError:
    """No key, or one the balancer does not know (OpenAI's answer: the SDK raises ``AuthenticationError``)."""
    message = (
        "Incorrect API key provided" if presented
        else "You didn't provide an API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
    )
    return ProxyError(401, message, "invalid_request_error", "invalid_api_key")


def model_not_allowed(model: str) -> ProxyError:
    """A model outside the key's list: OpenAI answers models you cannot see as if they did not exist."""
    shown = model if len(model) <= 200 else model[:197] + "..."
    return ProxyError(
        404, f"The model '{shown}' does not exist or you do not have access to it.", "invalid_request_error",
        "model_not_found",
    )


def rate_limited(message: str, kind: str, retry_after: float) -> ProxyError:
    """Over one of the key's limits (``kind``: ``requests``, ``tokens`` or ``concurrency``)."""
    return ProxyError(429, message, kind, "rate_limit_exceeded", retry_after=max(1, math.ceil(retry_after)))
