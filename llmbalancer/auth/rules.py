"""Who may call the balancer's own routes: the admin routes (``/admin/*``) and, when client keys are
configured, the observability routes (``/metrics``, ``/llmhealth-snapshot``, which the monitor reads).

Admin: with ``admin.token`` set, every admin call needs ``Authorization: Bearer <token>``, from any address
(401 otherwise). Without a token, only loopback peers are answered (403 otherwise), and not those that came
through a proxy: a request carrying ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP`` is refused (403,
naming ``admin.token``), since a reverse proxy on the same host makes every client look like loopback.

Observability, when keys are configured: the admin token or a key with ``observe: true`` (401 without
either, 403 for a key that may not observe). Without keys these routes stay open, as before.

Secrets are compared in constant time (the token as bytes; keys by digest) and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping

from llmbalancer import errors
from llmbalancer.auth.keys import KeyTable, presented

PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_token(secret: str | None, token: str) -> bool:
    # Bytes: compare_digest takes str only when ASCII, and a client may send anything.
    return secret is not None and hmac.compare_digest(secret.encode("utf-8", "surrogateescape"), token.encode())


def admin_refusal(peer: str | None, headers: Mapping[str, str], token: str | None) -> errors.ProxyError | None:
    """Why a request from ``peer`` with ``headers`` may not call an admin route, or None when it may."""
    if token is None:
        if not is_loopback(peer):
            return errors.forbidden("Admin routes answer loopback clients only (set admin.token to admit others)")
        through = next((name for name in PROXY_HEADERS if name in headers), None)
        if through is not None:
            return errors.forbidden(
                f"Admin routes refuse a request that came through a proxy ({through}) unless admin.token is set: "
                "set admin.token and send 'Authorization: Bearer <admin.token>'"
            )
        return None
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and is_token(given.strip(), token):
        return None
    return errors.unauthorized("Admin routes require 'Authorization: Bearer <admin.token>'")


def observer_refusal(headers: Mapping[str, str], token: str | None, keys: KeyTable) -> errors.ProxyError | None:
    """Why a request may not read ``/metrics`` or the snapshot, or None when it may."""
    if not keys:
        return None
    secret = presented(headers)
    if token is not None and is_token(secret, token):
        return None
    key = keys.find(secret)
    if key is None:
        return errors.ProxyError(
            401, "With client keys configured, /metrics and the monitor need the admin token or a key with "
            "observe: true ('Authorization: Bearer <key>')", "invalid_request_error", "invalid_api_key",
        )
    if not key.observe:
        return errors.forbidden(f"Key '{key.name}' may not read /metrics or the monitor (its observe is false)")
    return None
