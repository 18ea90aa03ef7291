"""The lean relay's HTTP/1.1 pieces on bytes: the chunked framing walked wherever a body is split, the
backend's response head read (or refused), and the heads written for the client."""

from __future__ import annotations

import random

import pytest

from llmbalancer.relay.wire import (
    Chunks,
    Malformed,
    ResponseHead,
    downstream_head,
    parse_response_head,
    payload_of,
)

EVENTS = [b'data: {"n":%d,"text":"%s"}\n\n' % (i, b"x" * (i * 7 % 50)) for i in range(12)]
BODY = (
    b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS[:6])
    + b"%X;ext=1\r\n%s\r\n" % (len(EVENTS[6]), EVENTS[6])  # upper-case size, a chunk extension
    + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS[7:])
    + b"0\r\nX-Trailer: t\r\n\r\n"
)
PAYLOAD = b"".join(EVENTS)


def _walk(pieces: list[bytes]) -> tuple[int, bytes, Chunks]:
    walker = Chunks()
    out: list[bytes] = []
    consumed = 0
    for piece in pieces:
        end = walker.feed(piece, out)
        if end >= 0:
            return consumed + end, b"".join(out), walker
        consumed += len(piece)
    return -1, b"".join(out), walker


def test_the_body_end_and_payload_are_found_wherever_the_body_is_split() -> None:
    for at in range(1, len(BODY)):
        end, payload, walker = _walk([BODY[:at], BODY[at:]])
        assert (end, payload, walker.payload) == (len(BODY), PAYLOAD, len(PAYLOAD)), at
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(BODY)), 6))
        pieces = [BODY[a:b] for a, b in zip([0, *cuts], [*cuts, len(BODY)], strict=True)]
        assert _walk(pieces)[:2] == (len(BODY), PAYLOAD)


def test_bytes_after_the_end_are_not_part_of_the_body() -> None:
    end, payload, _ = _walk([BODY + b"HTTP/1.1 200 OK\r\n"])
    assert (end, payload) == (len(BODY), PAYLOAD)


def test_whole_chunks_leave_the_walker_at_a_boundary_and_a_cut_chunk_counts_what_came() -> None:
    walker = Chunks()
    first = b"%x\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0])
    assert walker.feed(first) == -1 and walker.at_boundary
    assert walker.feed(b"%x\r\n%s" % (len(EVENTS[1]), EVENTS[1][:5])) == -1
    assert not walker.at_boundary
    assert walker.received == len(EVENTS[0]) + 5


def test_the_payload_of_a_tail_is_read_from_where_its_first_piece_began() -> None:
    for at in range(1, len(BODY) - 40, 7):
        walker = Chunks()
        before: list[bytes] = []
        walker.feed(BODY[:at], before)
        tail = payload_of([BODY[at : at + 40], BODY[at + 40 :]], walker.snapshot())
        assert b"".join(before) + tail == PAYLOAD, at


@pytest.mark.parametrize(
    "framing",
    [b"0x10\r\n", b"+5\r\n", b" 5\r\n", b"g\r\n", b"5\n", b"5\r\nhelloXY", b"1" * 20 + b"\r\n"],
)
def test_framing_that_is_not_chunked_encoding_is_refused(framing: bytes) -> None:
    with pytest.raises(Malformed):
        Chunks().feed(framing + b"\r\n" + b"0\r\n\r\n")


def _head(text: bytes) -> ResponseHead:
    return parse_response_head(text.replace(b"\n", b"\r\n"))


def test_a_response_head_is_read_for_its_framing_and_reuse() -> None:
    head = _head(b"HTTP/1.1 200 OK\nContent-Type: text/event-stream; charset=utf-8\nTransfer-Encoding: chunked")
    assert (head.status, head.chunked, head.length, head.reusable, head.event_stream) == (200, True, None, True, True)
    head = _head(b"HTTP/1.1 200 OK\nContent-Length: 12\nConnection: close")
    assert (head.length, head.reusable) == (12, False)
    head = _head(b"HTTP/1.0 200 OK\nContent-Length: 12")
    assert (head.length, head.reusable) == (12, False)
    head = _head(b"HTTP/1.1 200 OK\nContent-Type: application/json")  # until the backend closes
    assert (head.length, head.chunked, head.reusable) == (None, False, False)
    head = _head(b"HTTP/1.1 200 OK\nContent-Length: 5\nTransfer-Encoding: chunked")  # TE wins, not reused
    assert (head.length, head.chunked, head.reusable) == (None, True, False)
    head = _head(b"HTTP/1.1 204 No Content\nContent-Length: 5")
    assert (head.length, head.bodiless) == (0, True)
    assert _head(b"HTTP/1.1 200\nContent-Length: 0").reason == b""


@pytest.mark.parametrize(
    "text",
    [
        b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"ICY 200 OK", b"HTTP/1.1 200 OK\nno colon",
        b"HTTP/1.1 200 OK\nBad Name: x", b"HTTP/1.1 200 OK\nContent-Length: 5\nContent-Length: 6",
        b"HTTP/1.1 200 OK\nContent-Length: -1", b"HTTP/1.1 200 OK\r\nX: a\nb", b"HTTP/1.1 200 OK\n folded: x",
    ],
)
def test_a_head_that_is_not_plain_http_1_is_malformed(text: bytes) -> None:
    with pytest.raises(Malformed):
        parse_response_head(text.replace(b"\n", b"\r\n") if b"\r" not in text else text)


def test_the_clients_head_keeps_end_to_end_lines_as_they_came_and_drops_hop_by_hop_ones() -> None:
    head = _head(
        b"HTTP/1.1 200 OK\nserver: llama.cpp\nConnection: keep-alive, X-Hop\nX-Hop: 1\nKeep-Alive: timeout=5\n"
        b"Transfer-Encoding: chunked\nX-Request-ID: theirs\nContent-Type: text/event-stream"
    )
    out = downstream_head(head, "ours", b"Transfer-Encoding: chunked\r\n", close=True)
    assert out == (
        b"HTTP/1.1 200 OK\r\nserver: llama.cpp\r\nContent-Type: text/event-stream\r\nX-Request-ID: ours\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    assert downstream_head(_head(b"HTTP/1.0 404 Not Found"), "r", b"", close=False) == (
        b"HTTP/1.1 404 Not Found\r\nX-Request-ID: r\r\n\r\n"
    )
