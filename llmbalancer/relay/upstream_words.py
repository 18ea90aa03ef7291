"""What went wrong with a backend's answer, in words a user of the balancer understands (they end up in
the SSE ``error`` event and the health log), not aiohttp's ``TransferEncodingError: 400, message=...``."""

from __future__ import annotations

import aiohttp


def broke_off(exc: BaseException, received: int) -> str:
    """Why a response body stopped after ``received`` bytes of it."""
    after = f"after {received} bytes"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"the backend closed the connection {after}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        text = str(exc)
        # aiohttp's words when the connection ends inside a body (its length or its last chunk still due).
        if "not completed" in text or "Not enough data" in text:
            return f"the backend closed the connection {after}"
        return f"the backend sent a malformed response body {after}"
    if isinstance(exc, ConnectionResetError):
        return f"the connection to the backend was reset {after}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"the connection to the backend failed {after} ({exc.strerror.lower()})"
    text = str(exc) or type(exc).__name__
    return f"{text if len(text) <= 120 else text[:117] + '...'} ({after})"


def lost_after(exc: BaseException | None, received: int) -> str:
    """Why a body stopped after ``received`` bytes, its connection lost (``exc``: the transport's reason)."""
    after = f"after {received} bytes"
    if exc is None:
        return f"the backend closed the connection {after}"
    if isinstance(exc, ConnectionResetError):
        return f"the connection to the backend was reset {after}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"the connection to the backend failed {after} ({exc.strerror.lower()})"
    text = str(exc) or type(exc).__name__
    return f"{text if len(text) <= 120 else text[:117] + '...'} ({after})"


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
