"""Usage the balancer asks for itself: ``stream_options.include_usage`` on streamed OpenAI completions
sent to backends that report token counts nowhere else, and the usage chunk cut from what the client gets.

Which backends: kind ``openai``, or ``auto`` found by the health poller to be a plain OpenAI-compatible
server (``detected_kind``). The llama.cpp family is left alone: its finish chunk carries ``timings``
unasked (``usage.py`` reads them), so its client sees exactly what it sent; Ollama and other balancers
likewise. Which requests: streamed ``/v1/chat/completions`` and ``/v1/completions`` whose client did not
set ``include_usage: true`` itself (a client that asked gets every byte unchanged).

The cut: the spec's usage chunk is one SSE event, ``data: {... "choices":[] ..., "usage":{...}}``, just
before ``data: [DONE]``. ``UsageCut`` relays complete events at once and holds back only an incomplete
trailing one (which the client could not act on before its end arrives anyway), finds the usage event
with ``bytes.find`` (no JSON parsing or re-encoding of what passes), keeps it for the usage reader,
and relays everything unchanged once it is cut. An event with empty ``choices`` but no ``usage``
object (Azure's ``prompt_filter_results``) passes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from llmbalancer.fleet.backend import Backend
from llmbalancer.relay.inbound import InboundBody, encode_json

_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
_EMPTY_CHOICES = (b'"choices":[]', b'"choices": []')
_USAGE_OBJECT = (b'"usage":{', b'"usage": {')
# An "event" that never ends (not SSE after all) is relayed rather than held without bound.
_MAX_CARRY = 65536


def wants_usage(path: str, parsed: dict[str, Any] | None) -> bool:
    """A streamed OpenAI completion whose client did not ask for usage: the balancer may ask for it."""
    if path not in _ROUTES or parsed is None or parsed.get("stream") is not True:
        return False
    options = parsed.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def asks_usage_of(backend: Backend) -> bool:
    """Whether usage is asked of this backend (a plain OpenAI-compatible server, configured or detected)."""
    kind = backend.kind
    return kind == "openai" or (kind == "auto" and backend.health.detected_kind == "openai")


def with_usage(body: InboundBody) -> InboundBody:
    """``body`` with ``stream_options.include_usage: true`` (other stream options kept)."""
    assert body.parsed is not None
    data = body.data
    if "stream_options" not in body.parsed and data is not None and data.startswith(b"{") and body.parsed:
        # The usual case: the option goes in front of the object's members, and nothing is re-encoded.
        edited: dict[str, Any] = {"stream_options": {"include_usage": True}, **body.parsed}
        return InboundBody(b'{"stream_options":{"include_usage":true},' + data[1:], None, edited)
    options = body.parsed.get("stream_options")
    merged = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    parsed: dict[str, Any] = {**body.parsed, "stream_options": merged}
    return InboundBody(encode_json(parsed), None, parsed)


def _find_any(data: bytes, needles: tuple[bytes, ...], start: int = 0) -> int:
    for needle in needles:
        found = data.find(needle, start)
        if found >= 0:
            return found
    return -1


def _events_end(data: bytes) -> int:
    """The index just past the last event terminator (a blank line, LF or CRLF), 0 when there is none."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _event_bounds(data: bytes, at: int) -> tuple[int, int]:
    """Start and end (past its blank line) of the complete event containing index ``at``."""
    start = _events_end(data[:at])
    lf = data.find(b"\n\n", at)
    crlf = data.find(b"\n\r\n", at)
    ends = [e for e in (lf + 2 if lf >= 0 else -1, crlf + 3 if crlf >= 0 else -1) if e >= 0]
    return start, min(ends) if ends else len(data)


def split_usage(events: bytes) -> tuple[bytes, bytes]:
    """``events`` (complete SSE events) less the usage event, and that event (b"" when there is none)."""
    at = _find_any(events, _EMPTY_CHOICES)
    while at >= 0:
        start, end = _event_bounds(events, at)
        event = events[start:end]
        if _find_any(event, _USAGE_OBJECT) >= 0:
            return events[:start] + events[end:], event
        at = _find_any(events, _EMPTY_CHOICES, end)
    return events, b""


def cut_whole(body: bytes) -> bytes:
    """A streamed body that arrived whole, less its usage event."""
    end = _events_end(body)
    return split_usage(body[:end])[0] + body[end:]


class UsageCut:
    """Relays an SSE body less the usage event, which it keeps in ``usage``: through ``write`` (awaited), or
    as ``feed``/``flush`` for a caller that writes what they return itself (the lean relay)."""

    __slots__ = ("_carry", "_write", "cut_bytes", "usage")

    def __init__(self, write: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        self._write = write
        self._carry = b""
        self.usage = b""  # the cut event, for the usage reader
        self.cut_bytes = 0

    @property
    def holding(self) -> bool:
        """Whether part of an event is held back, waiting for its end."""
        return bool(self._carry)

    def feed(self, chunk: bytes) -> bytes:
        """What of the body so far may leave now: complete events, less the usage event."""
        if self.usage:
            return chunk  # cut already: the rest ([DONE]) passes as it comes
        data = self._carry + chunk if self._carry else chunk
        if data.endswith((b"\n\n", b"\r\n\r\n")):
            ready, self._carry = data, b""
        else:
            end = _events_end(data)
            ready, self._carry = data[:end], data[end:]
            if len(self._carry) > _MAX_CARRY:
                ready, self._carry = data, b""
        if b"[]" not in ready:  # one scan rules out the usual content chunk
            return ready
        out, self.usage = split_usage(ready)
        if self.usage:  # cut: from here on nothing is held back
            self.cut_bytes = len(self.usage)
            out, self._carry = out + self._carry, b""
        return out

    def flush(self) -> bytes:
        """The body ended: a held, never completed event, as it came."""
        carry, self._carry = self._carry, b""
        return carry

    async def write(self, chunk: bytes) -> None:
        assert self._write is not None
        out = self.feed(chunk)
        if out:
            await self._write(out)

    async def finish(self) -> None:
        """The body ended: relay a held, never completed event as it came."""
        assert self._write is not None
        carry = self.flush()
        if carry:
            await self._write(carry)
