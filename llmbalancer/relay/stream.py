"""A response body relayed from a backend's connection to the client's, in the callbacks of the two
protocols: each piece the backend's socket gives is written to the client's transport in the same call.

* Framing: a chunked body whose payload is not edited passes as the backend framed it (the walker in
  ``wire.Chunks`` only finds its end); so does a body of announced length. A body edited on its way (the
  usage event cut) or one that runs until the backend closes is sent chunked, a chunk per piece.
* Backpressure: when the client's transport buffers past its high-water mark (``pause_writing``), the
  backend's socket is no longer read (``pause_reading``) until it drains; the kernel's buffers then hold
  the backend back, and memory per stream stays bounded.
* Idle: one sweep (``relay.sweep``) checks every stream; a chunk only sets a flag. No byte for ``idle``
  seconds is the backend's silence, unless the client was not reading all that time: then the client
  stalled, and it is cut off, not held against the backend.
* Ends: ``Ending`` says how (complete, broken off by the backend and why, or left by the client).
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from llmbalancer.fleet.usage import TAIL_PIECE, kept
from llmbalancer.relay.access import Access
from llmbalancer.relay.sweep import Sweep
from llmbalancer.relay.upstream import Answer
from llmbalancer.relay.upstream_words import lost_after
from llmbalancer.relay.usage_chunk import UsageCut
from llmbalancer.relay.wire import Chunks, Malformed, chunk, payload_of

PASS_CHUNKED, PASS_LENGTH, RECHUNK = 0, 1, 2


class Ending(NamedTuple):
    broken: str | None = None  # why the backend broke off, when it did
    client_left: str | None = None  # client_closed or client_stalled, when the client went


_COMPLETE = Ending()


class StreamRelay:
    __slots__ = (
        "_access", "_answer", "_chunks", "_client", "_conn", "_cut", "_done", "_first", "_fresh", "_idle", "_last",
        "_left", "_mode", "_paused", "_previous", "_reusable", "_seen", "_sent", "_snap_last", "_snap_previous",
        "_sweep", "ended",
    )

    def __init__(
        self, client: asyncio.Transport, answer: Answer, access: Access, mode: int, cut: UsageCut | None,
        sweep: Sweep, idle: float,
    ) -> None:
        head = answer.head
        self._client = client
        self._answer = answer
        self._conn = answer.conn
        self._access = access
        self._mode = mode
        self._cut = cut
        self._sweep = sweep
        self._idle = idle
        self._chunks = Chunks() if head.chunked else None
        self._left = head.length  # bytes of an announced length still due
        self._reusable = head.reusable
        self._done: asyncio.Future[Ending] = asyncio.get_running_loop().create_future()
        self._fresh = False
        self._seen = 0.0
        self._paused = False
        self._first = True
        self._sent = 0  # payload bytes written (re-chunked and length-framed bodies)
        self._previous = self._last = b""
        self._snap_previous = self._snap_last = Chunks().snapshot()
        self.ended = False

    @property
    def client_framing_whole(self) -> bool:
        """Whether what the client got so far is whole chunks (so an error event can still follow)."""
        if self._mode == RECHUNK:
            return True
        return self._mode == PASS_CHUNKED and self._chunks is not None and self._chunks.at_boundary

    def start(self, head: bytes, early: bytes) -> asyncio.Future[Ending]:
        """Write ``head`` (with the body bytes that came along with the backend's head) and relay the rest."""
        out = b""
        if early:
            self._first = False
            self._access.ttfb = time.monotonic()
            self._access.usage_head = early
            try:
                out = self._process(early)
            except Malformed:
                self._client.write(head)
                self._broke()
                return self._done
        self._client.write(head + out if out else head)
        if self.ended:
            self._complete()
        else:
            self._seen = asyncio.get_running_loop().time()
            self._sweep.add(self)
            if self._conn.transport is None:
                self.upstream_lost(None)  # the backend went away before the relay began
            else:
                self._conn.attach(self)
        return self._done

    def upstream_data(self, data: bytes) -> None:
        self._fresh = True
        if self._first:
            self._first = False
            self._access.ttfb = time.monotonic()
            self._access.usage_head = data
        try:
            out = self._process(data)
        except Malformed:
            self._broke()
            return
        if out:
            self._client.write(out)
        if self.ended:
            self._complete()

    def _process(self, data: bytes) -> bytes:
        """What to write to the client for ``data``; sets ``ended`` when the body is complete."""
        mode = self._mode
        chunks = self._chunks
        if mode == PASS_CHUNKED:
            assert chunks is not None
            if len(self._last) >= TAIL_PIECE:  # _keep starts a new piece: the walker's state where it begins
                self._snap_previous, self._snap_last = self._snap_last, chunks.snapshot()
            end = chunks.feed(data)
            if end >= 0:
                self.ended = True
                if end < len(data):  # bytes after the body's end: not a connection to trust again
                    data, self._reusable = data[:end], False
            self._keep(data)
            return data
        if mode == PASS_LENGTH:
            left = self._left
            assert left is not None
            if len(data) >= left:
                self.ended = True
                if len(data) > left:
                    data, self._reusable = data[:left], False
            self._left = left - len(data)
            self._sent += len(data)
            self._keep(data)
            return data
        cut = self._cut
        if chunks is not None and cut is not None and not cut.holding and chunks.at_boundary and b"[]" not in data:
            # Whole chunks of whole events, none the usage event (its "choices":[] is not there): the cut would
            # relay their payload unchanged, so the chunks pass as they came.
            before = chunks.payload
            if chunks.feed(data) < 0 and chunks.at_boundary and data.endswith(b"\n\n\r\n"):
                self._sent += chunks.payload - before
                self._keep(data)
                return data
            chunks.left, chunks.payload = 0, before  # the slow way after all: walk it again from the boundary
            chunks.restart()
        if chunks is not None:
            pieces: list[bytes] = []
            end = chunks.feed(data, pieces)
            if end >= 0:
                self.ended = True
                self._reusable = self._reusable and end == len(data)
            payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        elif self._left is not None:
            payload = data[: self._left]
            self._left -= len(payload)
            if self._left == 0:
                self.ended = True
                self._reusable = self._reusable and len(payload) == len(data)
        else:
            payload = data  # until the backend closes
        out = cut.feed(payload) if cut is not None else payload
        if self.ended and cut is not None:
            out += cut.flush()
        self._keep(payload)
        self._sent += len(out)
        framed = chunk(out) if out else b""
        return framed + b"0\r\n\r\n" if self.ended else framed

    def _keep(self, data: bytes) -> None:
        """The body's last bytes, for the usage its last events report (``usage.kept``)."""
        self._previous, self._last = kept(self._previous, self._last, data)

    def upstream_lost(self, exc: BaseException | None) -> None:
        if self.ended:
            return
        if self._mode == RECHUNK and self._chunks is None and self._left is None:
            # The end of a body that runs until the backend closes: complete.
            self.ended, self._reusable = True, False
            tail = self._cut.flush() if self._cut is not None else b""
            self._sent += len(tail)
            self._client.write((chunk(tail) if tail else b"") + b"0\r\n\r\n")
            self._complete()
            return
        self._finish(Ending(broken=lost_after(exc, self.received)))

    @property
    def received(self) -> int:
        """Payload bytes the client was sent so far."""
        if self._mode == PASS_CHUNKED and self._chunks is not None:
            return self._chunks.received
        return self._sent

    def client_paused(self) -> None:
        self._paused = True
        transport = self._conn.transport
        if transport is not None:
            transport.pause_reading()

    def client_resumed(self) -> None:
        self._paused = False
        self._fresh = True
        transport = self._conn.transport
        if transport is not None:
            transport.resume_reading()

    def client_lost(self) -> None:
        """The client's connection is gone: stop at once, so the backend sees the disconnect and frees its slot."""
        self._finish(Ending(client_left="client_closed"))

    def swept(self, now: float) -> None:
        if self._fresh:
            self._fresh = False
            self._seen = now
        elif now - self._seen >= self._idle:
            if self._paused:
                self._client.abort()
                self._finish(Ending(client_left="client_stalled"))
            else:
                self._finish(Ending(broken=f"no data for {self._idle:g} s"))

    def _broke(self) -> None:
        self._finish(Ending(broken=f"the backend sent a malformed response body after {self.received} bytes"))

    def _complete(self) -> None:
        self._finish(_COMPLETE)

    def _finish(self, ending: Ending) -> None:
        if self._done.done():
            return
        self._sweep.discard(self)
        conn = self._conn
        if ending is _COMPLETE:
            if self._paused and conn.transport is not None:
                conn.transport.resume_reading()
            self._answer.finish(self._reusable)
        else:
            self._answer.close()
        access = self._access
        access.bytes = self.received
        if ending is _COMPLETE:
            if self._cut is not None and self._cut.usage:
                access.usage_tail = self._cut.usage
            elif self._mode == PASS_CHUNKED:
                access.usage_tail = payload_of([self._previous, self._last], self._snap_previous)
            else:
                access.usage_tail = self._previous + self._last
        self._done.set_result(ending)
