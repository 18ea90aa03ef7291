"""Header rules for relaying HTTP through a proxy (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from llmbalancer.relay.inbound import decoded_on_arrival

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed by the client library for the body we send, or set by us.
_REQUEST_DROP = HOP_BY_HOP | {
    "host", "content-length", "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id"}
# A client's credentials: the balancer's own when keys are configured, and replaced by a backend's own api_key.
CREDENTIALS = frozenset({"authorization", "x-api-key"})


def _drop_set(headers: Mapping[str, str], base: frozenset[str]) -> frozenset[str]:
    # Per request on the hot path: build a new set only when a Connection header names extra headers.
    value = headers.get("Connection")
    if not value:
        return base
    named = {token.strip().lower() for token in value.split(",")}
    return base if named <= base else base | named  # "keep-alive" and "close" are in every base


def upstream_request_headers(
    headers: Mapping[str, str], items: Iterable[tuple[str, str]], client: str, scheme: str, host: str | None,
    request_id: str, keep_content_length: bool, strip_credentials: bool = False, api_key: str | None = None,
) -> list[tuple[str, str]]:
    """The headers to send a backend: the client's end-to-end ones and ours. ``strip_credentials``: the client's
    ``Authorization`` and ``x-api-key`` stay here (they are keys of the balancer's); ``api_key``: the backend's
    own, sent in their place."""
    drop = _drop_set(headers, _REQUEST_DROP)
    if strip_credentials or api_key:
        drop = drop | CREDENTIALS
    if "Content-Encoding" in headers and decoded_on_arrival(headers):
        # aiohttp decoded the body on its way in: what goes on is the decoded body, of another length.
        drop = drop | {"content-encoding"}
        keep_content_length = False
    out = [(k, v) for k, v in items if k.lower() not in drop]
    if keep_content_length and "Content-Length" in headers:
        out.append(("Content-Length", headers["Content-Length"]))
    previous = headers.get("X-Forwarded-For")
    out.append(("X-Forwarded-For", f"{previous}, {client}" if previous else client))
    out.append(("X-Forwarded-Proto", scheme))
    if host:
        out.append(("X-Forwarded-Host", host))
    out.append(("X-Request-ID", request_id))
    if api_key:
        out.append(("Authorization", f"Bearer {api_key}"))
    return out


def downstream_response_headers(headers: Mapping[str, str], items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    drop = _drop_set(headers, _RESPONSE_DROP)
    return [(k, v) for k, v in items if k.lower() not in drop]
