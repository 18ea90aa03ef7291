"""Slow and stalled clients are cut off: an idle kept-alive connection after ``server.keepalive_timeout``,
a request head not complete within ``server.header_timeout`` (408), a body that stops arriving for
``server.body_timeout`` (408); a slow but steady upload goes on, and 2,000 idle connections starve nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.raw_http import exchange, parse_reply, read_reply
from tests.support import RunningBalancer, make_config, run_balancer

CHAT = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
TINY = {"server.keepalive_timeout": 0.5, "server.header_timeout": 0.5, "server.body_timeout": 0.5}


@contextlib.asynccontextmanager
async def _balancer(**overrides: Any) -> AsyncIterator[RunningBalancer]:
    async with run_fake_llama() as fake, run_balancer(make_config([fake.url], **{**TINY, **overrides})) as balancer:
        yield balancer


async def _until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    started = time.monotonic()
    received = b""
    async with asyncio.timeout(limit):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk
    return received, time.monotonic() - started


def _post_head(length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


async def test_an_idle_kept_alive_connection_is_closed_after_keepalive_timeout() -> None:
    async with _balancer(**{"server.header_timeout": 30.0}) as balancer:
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_reply(reader)).status == 200
            rest, waited = await _until_closed(reader, 5.0)
            assert rest == b"" and 0.3 < waited < 2.0
        finally:
            writer.close()


async def test_a_connection_that_sends_nothing_gets_408_after_header_timeout() -> None:
    async with _balancer(**{"server.keepalive_timeout": 30.0}) as balancer:
        started = time.monotonic()
        raw = await exchange(balancer.port, b"", timeout=5.0)
        assert 0.3 < time.monotonic() - started < 2.0
        reply = parse_reply(raw)
        assert reply.status == 408 and reply.error_code() == "request_timeout"


async def test_a_head_trickled_a_line_at_a_time_gets_408_after_header_timeout() -> None:
    async with _balancer(**{"server.keepalive_timeout": 30.0}) as balancer:
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)

        async def trickle() -> None:  # slowloris: one more header every 0.1 s, never the blank line
            writer.write(b"GET /health HTTP/1.1\r\n")
            for i in range(100):
                await asyncio.sleep(0.1)
                writer.write(b"X-Trickle-%d: 1\r\n" % i)

        started = time.monotonic()
        trickling = asyncio.create_task(trickle())
        try:
            first = await asyncio.wait_for(reader.read(65536), 5.0)
            trickling.cancel()
            rest, _ = await _until_closed(reader, 5.0)
            assert 0.3 < time.monotonic() - started < 2.0
            reply = parse_reply(first + rest)
            assert reply.status == 408 and reply.error_code() == "request_timeout"
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await trickling
            writer.close()


async def test_the_next_head_on_a_kept_alive_connection_has_header_timeout_too() -> None:
    async with _balancer(**{"server.keepalive_timeout": 30.0}) as balancer:
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_reply(reader)).status == 200
            await asyncio.sleep(0.8)  # idle longer than header_timeout: the keep-alive wait is not the head's
            started = time.monotonic()
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            raw, _ = await _until_closed(reader, 5.0)
            assert 0.3 < time.monotonic() - started < 2.0
            assert parse_reply(raw).status == 408
        finally:
            writer.close()


async def test_a_body_shorter_than_its_content_length_gets_408_after_body_timeout() -> None:
    async with _balancer(**{"server.keepalive_timeout": 30.0}) as balancer:
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            raw = await exchange(balancer.port, _post_head(len(CHAT) + 10) + CHAT, timeout=5.0)
            assert 0.3 < time.monotonic() - started < 2.0
        reply = parse_reply(raw)
        assert reply.status == 408 and reply.error_code() == "request_timeout"
        assert reply.headers["x-request-id"]
        assert [e["status"] for e in logs if e["event"] == "request"] == [408]


async def test_a_streamed_body_that_stalls_on_its_way_to_a_backend_gets_408_and_blames_no_backend() -> None:
    async with _balancer(**{"server.keepalive_timeout": 30.0}) as balancer:
        head = (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 300000\r\n\r\n"
        )
        raw = await exchange(balancer.port, head + b"x" * 100_000, timeout=5.0)
        reply = parse_reply(raw)
        assert reply.status == 408 and reply.error_code() == "request_timeout"
        assert all(b.routable and b.traffic.consecutive_failures == 0 for b in balancer.components.registry)


async def test_a_stalled_body_nobody_reads_closes_the_connection_after_body_timeout() -> None:
    # /health answers without reading the body; aiohttp then reads the rest to discard it, up to 10 s.
    async with _balancer(**{"server.keepalive_timeout": 30.0}) as balancer:
        started = time.monotonic()
        raw = await exchange(balancer.port, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        assert parse_reply(raw).status == 200
        assert time.monotonic() - started < 3.0


async def test_a_slow_but_steady_upload_goes_on() -> None:
    async with _balancer() as balancer:
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            writer.write(_post_head(len(CHAT)))
            pieces = [CHAT[i : i + 10] for i in range(0, len(CHAT), 10)]
            started = time.monotonic()
            for piece in pieces:  # 0.2 s between pieces: slower in all than body_timeout, never stalled that long
                await asyncio.sleep(0.2)
                writer.write(piece)
            assert time.monotonic() - started > 1.0
            reply = await read_reply(reader)
            assert reply.status == 200, reply.body
            assert reply.json()["choices"]
        finally:
            writer.close()


async def test_two_thousand_idle_connections_starve_nothing() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4400  # both ends of each connection live in this process
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        async with _balancer(**{"server.header_timeout": 60.0, "server.keepalive_timeout": 60.0}) as balancer:
            idle: list[asyncio.StreamWriter] = []
            try:
                for _ in range(20):
                    opened = await asyncio.gather(
                        *(asyncio.open_connection("127.0.0.1", balancer.port) for _ in range(100))
                    )
                    idle += [writer for _, writer in opened]
                await asyncio.sleep(0.2)
                async with aiohttp.ClientSession() as session:
                    started = time.monotonic()
                    async with session.post(
                        balancer.url + "/v1/chat/completions", data=CHAT, headers={"Content-Type": "application/json"}
                    ) as reply:
                        assert reply.status == 200
                    async with session.get(balancer.url + "/health") as reply:
                        assert reply.status == 200
                    assert time.monotonic() - started < 2.0
                assert all(not writer.is_closing() for writer in idle)
            finally:
                for writer in idle:
                    writer.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
