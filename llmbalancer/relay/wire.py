"""HTTP/1.1 on the wire, for the lean relay: a backend's response head, the chunked framing of its body
(walked, not decoded, so that the bytes pass on as they came), and the heads the relay writes.

A response head that is not plain HTTP/1.x (no status line, a header line without a colon, a folded line,
two different Content-Lengths) is ``Malformed``: the attempt failed, as aiohttp's parser would have said.
"""

from __future__ import annotations

import http
from dataclasses import dataclass

from llmbalancer.errors import ProxyError

# Hop-by-hop (RFC 9110 7.6.1) and the framing the relay writes itself; lower-cased header names as bytes.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
     b"trailer", b"transfer-encoding", b"upgrade"}
)
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"x-request-id"}
_HEX = b"0123456789abcdefABCDEF"
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MAX_LINE = 8190
_LENGTH, _CODING, _CONNECTION, _TYPE = range(4)
_FRAMING = {b"content-length": _LENGTH, b"transfer-encoding": _CODING, b"connection": _CONNECTION,
            b"content-type": _TYPE}


class Malformed(Exception):
    """A response the relay cannot take as HTTP/1.1 (its words end up in the access log and error event)."""


@dataclass(slots=True)
class ResponseHead:
    status: int
    status_line: bytes
    headers: list[tuple[bytes, bytes]]  # (lower-cased name, the line as it came)
    length: int | None  # the body's Content-Length; None: chunked, or until the connection closes
    chunked: bool
    reusable: bool  # the connection may carry another request once this body has been read
    content_type: bytes  # the media type, lower-cased, without parameters
    named: frozenset[bytes]  # header names the backend's Connection header lists (hop-by-hop too)

    @property
    def reason(self) -> bytes:
        return self.status_line[13:]

    @property
    def bodiless(self) -> bool:
        return self.status in (204, 304) or self.status < 200

    @property
    def event_stream(self) -> bool:
        return self.content_type == b"text/event-stream"


def parse_response_head(head: bytes) -> ResponseHead:
    """``head``: the bytes up to (not including) the blank line that ends it."""
    lines = head.split(b"\r\n")
    first = lines[0]
    if (
        not first.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) or not first[9:12].isdigit()
        or first[12:13] not in (b"", b" ")
    ):
        raise Malformed(f"not an HTTP/1.x status line: {first[:60]!r}")
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise Malformed("a bare CR or LF in the response head")
    reusable = first[7] == 49  # HTTP/1.1
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = coded = False
    content_type = b""
    named: frozenset[bytes] = frozenset()
    for line in lines[1:]:
        colon = line.find(b":")
        name = line[:colon]
        if colon <= 0 or name.translate(None, _TOKEN_CHARS):
            raise Malformed(f"a header line that is not 'name: value': {line[:60]!r}")
        lower = name.lower()
        headers.append((lower, line))
        kind = _FRAMING.get(lower)
        if kind is None:
            continue
        value = line[colon + 1 :].strip(b" \t")
        if kind == _LENGTH:
            if not value.isdigit() or (length is not None and int(value) != length):
                raise Malformed(f"Content-Length {value[:30]!r}")
            length = int(value)
        elif kind == _CODING:
            coded = True
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        elif kind == _CONNECTION:
            named = frozenset(token.strip().lower() for token in value.split(b","))
            if b"close" in named:
                reusable = False
        else:
            content_type = value.split(b";", 1)[0].strip().lower()
    status = int(first[9:12])
    result = ResponseHead(status, first, headers, length, chunked, reusable, content_type, named)
    if result.bodiless:
        result.length, result.chunked = 0, False
    elif coded:
        # Transfer-Encoding overrides Content-Length (RFC 9112 6.3); a coding other than chunked last: until close.
        result.length = None
        if not chunked or length is not None:
            result.reusable = False
    elif length is None:
        result.reusable = False  # read until the backend closes
    return result


def downstream_head(head: ResponseHead, request_id: str, framing: bytes, close: bool, limits: bool = False) -> bytes:
    """The head for the client: the backend's status and end-to-end header lines as they came, our request id
    and ``framing`` (a ``Content-Length`` or ``Transfer-Encoding`` line, or nothing, and for a keyed request
    its rate-limit headers). ``limits``: those replace any the backend sent."""
    drop = RESPONSE_DROP | head.named if head.named else RESPONSE_DROP
    lines = [b"HTTP/1.1" + head.status_line[8:]]
    if limits:
        lines += [line for lower, line in head.headers if lower not in drop and not lower.startswith(b"x-ratelimit-")]
    else:
        lines += [line for lower, line in head.headers if lower not in drop]
    connection = b"Connection: close\r\n" if close else b""
    lines.append(b"X-Request-ID: %s\r\n%s%s" % (request_id.encode(), framing, connection))
    return b"\r\n".join(lines) + b"\r\n"


def error_response(error: ProxyError, request_id: str | None, close: bool, lines: bytes = b"") -> bytes:
    """``error`` as a whole HTTP/1.1 response, as ``ProxyError.response`` is through aiohttp; ``lines``: more
    header lines (a keyed request's rate-limit headers)."""
    body = error.body()
    extra = b"X-Request-ID: %s\r\n" % request_id.encode() if request_id else b""
    extra += lines
    if error.retry_after is not None:
        extra += b"Retry-After: %d\r\n" % error.retry_after
    if close:
        extra += b"Connection: close\r\n"
    phrase = http.HTTPStatus(error.status).phrase.encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (error.status, phrase, len(body), extra, body)
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

_SIZE, _TRAILER, _DONE = 0, 1, 2


class Chunks:
    """Walks the chunked framing of a body as its bytes arrive: where the body ends, how much payload
    went by, and (on request) the payload itself, without copying what only passes through.

    ``left`` counts what is still due of the current chunk: its payload, then its CRLF."""

    __slots__ = ("_line", "_state", "left", "payload")

    def __init__(self, left: int = 0, line: bytes = b"", state: int = _SIZE, payload: int = 0) -> None:
        self.left = left
        self._line = line
        self._state = state
        self.payload = payload

    def snapshot(self) -> tuple[int, bytes, int]:
        return self.left, self._line, self._state

    @classmethod
    def resumed(cls, snapshot: tuple[int, bytes, int]) -> Chunks:
        left, line, state = snapshot
        return cls(left, line, state)

    def restart(self) -> None:
        """Back to a chunk boundary (with ``left`` and ``payload`` set back by the caller)."""
        self._line, self._state = b"", _SIZE

    @property
    def at_boundary(self) -> bool:
        """Between two chunks: what was relayed so far is whole chunks."""
        return self.left == 0 and not self._line and self._state == _SIZE

    @property
    def received(self) -> int:
        """Payload bytes that actually arrived (a chunk cut short counts what came of it)."""
        return self.payload - max(0, self.left - 2)

    def feed(self, data: bytes, out: list[bytes] | None = None) -> int:
        """Walk ``data``; the index just past the body's end, or -1 while it goes on. With ``out``, payload
        pieces are appended to it. Raises ``Malformed``."""
        pos = 0
        size = len(data)
        left = self.left
        while pos < size:
            if left > 2:
                end = pos + left - 2
                if end > size:
                    end = size
                if out is not None:
                    out.append(data[pos:end])
                left -= end - pos
                pos = end
                continue
            if left:
                due = b"\r\n"[2 - left :]
                got = data[pos : pos + left]
                if not due.startswith(got):
                    self.left = left
                    raise Malformed("a chunk not followed by CRLF")
                pos += len(got)
                left -= len(got)
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > _MAX_LINE:
                    raise Malformed("a chunk size line too long")
                break
            line = self._line + data[pos:newline] if self._line else data[pos:newline]
            self._line = b""
            pos = newline + 1
            if not line.endswith(b"\r"):
                raise Malformed("a chunk line not ended by CRLF")
            if self._state == _TRAILER:
                if line == b"\r":
                    self._state = _DONE
                    self.left = 0
                    return pos
                continue
            digits = line[:-1].split(b";", 1)[0].rstrip(b" \t")
            if not digits or len(digits) > 15 or digits.strip(_HEX):
                raise Malformed(f"a chunk size that is not hexadecimal: {digits[:20]!r}")
            count = int(digits, 16)
            if count == 0:
                self._state = _TRAILER
                continue
            self.payload += count
            left = count + 2
        self.left = left
        return -1


def payload_of(pieces: list[bytes], start: tuple[int, bytes, int] | None) -> bytes:
    """The payload in raw chunked ``pieces`` whose first began with the walker in state ``start``."""
    if start is None:
        return b"".join(pieces)
    walker = Chunks.resumed(start)
    out: list[bytes] = []
    try:
        for piece in pieces:
            if walker.feed(piece, out) >= 0:
                break
    except Malformed:
        pass
    return b"".join(out)
