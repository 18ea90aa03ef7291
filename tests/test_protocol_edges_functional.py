"""Protocol edges: a backend's unasked 101 is a 502, ``Expect: 100-continue`` over the body limit is 413
without an invitation to upload, a request line that is not HTTP/1.x is 400 at once, and a backend that
breaks off mid-stream is described in plain words."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import aiohttp

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.raw_http import exchange, parse_reply
from tests.support import make_config, run_balancer

OK_JSON = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"ok"}'
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@contextlib.asynccontextmanager
async def _switching_backend() -> AsyncIterator[str]:
    """A backend healthy to every GET (the health probes) that answers anything else 101 Switching Protocols."""

    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                lengths = [int(line[15:]) for line in lines if line.startswith(b"content-length:")]
                await reader.readexactly(lengths[0] if lengths else 0)
                if head.startswith(b"GET "):
                    writer.write(OK_JSON)
                else:
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.2)
                    break
                await writer.drain()
        writer.close()
        handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_a_101_from_a_backend_that_was_not_asked_to_upgrade_is_a_502() -> None:
    async with (
        _switching_backend() as url,
        run_balancer(make_config([url])) as balancer,
        aiohttp.ClientSession() as session,session.post(
        balancer.url + "/v1/chat/completions", json=CHAT, headers={"Connection": "Upgrade", "Upgrade": "h2c"}
    ) as reply
    ):
        assert reply.status == 502
        error = (await reply.json())["error"]
        assert error["code"] == "upstream_protocol_error"
        assert "101" in error["message"]


async def test_expect_100_continue_over_the_body_limit_is_413_without_an_invitation() -> None:
    async with run_fake_llama() as fake:
        config = make_config([fake.url], **{"server.max_body_bytes": 1000})
        async with run_balancer(config) as balancer:
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            try:
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
                )
                first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert first.startswith(b"HTTP/1.1 413"), first
            finally:
                writer.close()
            # Within the limit, the upload is invited and served.
            body = json.dumps(CHAT).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            try:
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
                )
                assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(body)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
            finally:
                writer.close()


async def test_a_request_line_that_is_not_http_1_is_400_at_once() -> None:
    async with run_fake_llama() as fake, run_balancer(make_config([fake.url])) as balancer:
        for line, shown in ((b"GET /\r\n", "HTTP/0.9"), (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", "HTTP/2.0")):
            started = time.monotonic()
            reply = parse_reply(await exchange(balancer.port, line, timeout=5))
            assert time.monotonic() - started < 1.0
            assert reply.status == 400 and reply.error_code() == "unsupported_http_version"
            assert shown in reply.json()["error"]["message"]


async def test_a_backend_breaking_off_mid_stream_is_described_in_plain_words_with_the_byte_count() -> None:
    async with run_fake_llama() as fake:
        fake.set_fault("crash_mid_stream", after_tokens=3)
        async with (
            run_balancer(make_config([fake.url])) as balancer,
            aiohttp.ClientSession() as session,
            session.post(balancer.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as reply,
        ):
            body = await reply.read()
    before, _, event = body.rpartition(b"event: error\ndata: ")
    message = json.loads(event)["error"]["message"]
    assert f"the backend closed the connection after {len(before)} bytes" in message, message
    assert "Error" not in message and "400" not in message
