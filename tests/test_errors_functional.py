"""Every status the balancer answers itself, each with its OpenAI-style JSON body."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from llmbalancer.fleet.backend import BackendState
from llmbalancer.testing.fake_llama import run_fake_fleet, run_fake_llama
from tests.support import LlamaServer, free_port, make_config, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


async def _error_of(reply: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, await reply.text()
    assert reply.content_type == "application/json"
    assert reply.headers["X-Request-ID"]
    body = await reply.json()
    error = body["error"]
    assert set(body) == {"error"}
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code and error["message"] and error["type"]
    return dict(error)


async def test_no_backend_configured_is_503_with_retry_after() -> None:
    async with run_balancer(make_config([])) as balancer, aiohttp.ClientSession() as session:
        async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
            await _error_of(reply, 503, "no_backend_available")
            assert int(reply.headers["Retry-After"]) >= 1
        async with session.get(balancer.url + "/health") as reply:
            assert reply.status == 503
            assert (await reply.json())["backends_healthy"] == 0


async def test_no_healthy_backend_is_503_with_retry_after() -> None:
    config = make_config([f"http://127.0.0.1:{free_port()}"])
    async with (
        run_balancer(config) as balancer,
        aiohttp.ClientSession() as session,
        session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply,
    ):
        error = await _error_of(reply, 503, "no_backend_available")
        assert reply.headers["Retry-After"]
        assert "healthy" in error["message"]


async def test_every_attempt_failing_to_connect_is_502() -> None:
    config = make_config([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"])
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        registry = balancer.components.registry
        # The health poller may mark a dead backend unhealthy before the request reaches it; while at
        # least one is still believed routable the answer is 502, so try a bounded number of times.
        for _ in range(10):
            for backend in registry:
                registry.set_state(backend, BackendState.HEALTHY, "test")
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                if reply.status == 503:
                    continue
                error = await _error_of(reply, 502, "upstream_unreachable")
                assert "refused" in error["message"].lower() or "connect" in error["message"].lower()
                break
        else:
            raise AssertionError("never reached a routable dead backend")
        assert all(b.state is BackendState.UNHEALTHY for b in registry)


async def test_body_over_the_limit_is_413_whether_declared_or_streamed(llama_fleet: list[LlamaServer]) -> None:
    # A real backend: a streamed body of a non-JSON route only overruns the limit on its way to one.
    config = make_config([llama_fleet[0].url], **{"server.max_body_bytes": 100_000})
    big = b'{"model": "smollm2", "prompt": "' + b"x" * 400_000 + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        for path in ("/v1/completions", "/upload"):
            headers = {"Content-Type": "application/json" if path.startswith("/v1") else "application/octet-stream"}
            async with session.post(balancer.url + path, data=big, headers=headers) as reply:
                await _error_of(reply, 413, "request_too_large")
            async with session.post(balancer.url + path, data=chunked(), headers=headers) as reply:
                await _error_of(reply, 413, "request_too_large")


async def test_invalid_json_on_an_openai_route_is_400() -> None:
    config = make_config([f"http://127.0.0.1:{free_port()}"])
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        url = balancer.url + "/v1/chat/completions"
        for body in (b"{not json", b"", b"[1, 2]", b"\xff\xfe"):
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as reply:
                await _error_of(reply, 400, "invalid_json")


async def test_invalid_json_never_reaches_the_backend() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
        session.post(balancer.url + "/v1/chat/completions", data=b'{"model": ') as reply,
    ):
        await _error_of(reply, 400, "invalid_json")
        assert fake.stats["requests"].get("/v1/chat/completions") is None


async def test_upstream_timeout_before_the_first_byte_is_504() -> None:
    async with run_fake_llama() as fake:
        fake.set_fault("hang")
        config = make_config([fake.url], **{"timeouts.first_byte": 0.3})
        async with (
            run_balancer(config) as balancer,
            aiohttp.ClientSession() as session,
            session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply,
        ):
            error = await _error_of(reply, 504, "upstream_timeout")
            assert "0.3" in error["message"]
            assert balancer.components.registry.backends[0].traffic.errors_total == 1


async def test_requests_waiting_on_a_backend_that_hangs_are_retried_once_its_health_checks_fail() -> None:
    # A hung server (SIGSTOP, a wedged process) accepts connections and answers nothing, /health included.
    # Requests already sent to it get their answer from the other server once the poller judges it
    # unhealthy, not a 504 after timeouts.first_byte.
    async with run_fake_fleet(2) as (sound, hung):
        config = make_config(
            [f"{sound.url}=sound", f"{hung.url}=hung"],
            **{"health.interval": 0.2, "timeouts.health": 0.3, "policy.name": "round_robin"},
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            await wait_for(lambda: all(b.routable for b in balancer.components.registry), timeout=5)
            hung.set_fault("hang", paths=["*"])

            async def chat() -> int:
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    await reply.read()
                    return reply.status

            started = time.monotonic()
            statuses = await asyncio.wait_for(asyncio.gather(*(chat() for _ in range(4))), timeout=10)
            assert statuses == [200] * 4
            assert time.monotonic() - started < 5  # first_byte is 300 s: nobody waited it out
            backend = balancer.components.registry.get("hung")
            assert backend is not None and backend.state is BackendState.UNHEALTHY
            assert "health check" in backend.state_reason
            assert "health checks failing" in (backend.traffic.last_error or "")
            hung.clear_fault()


def _fill_accept_queue(port: int) -> list[socket.socket]:
    """Connect to a listener that never accepts until a connect times out: its queue is full (bounded)."""
    fillers: list[socket.socket] = []
    for _ in range(8):
        try:
            fillers.append(socket.create_connection(("127.0.0.1", port), timeout=0.3))
        except TimeoutError:
            return fillers
    raise AssertionError("the accept queue never filled")


async def test_a_connect_timeout_is_retried_on_the_other_backend() -> None:
    # A server whose accept queue is full drops new SYNs: connecting times out (timeouts.connect).
    # That is the backend's failure, retried like a refusal, not the first-byte 504.
    async with run_fake_llama() as sound:
        jammed_port = free_port()
        async with run_fake_llama(port=jammed_port) as jammed:
            config = make_config(
                [f"{jammed.url}=jammed", f"{sound.url}=sound"],
                **{"health.interval": 60, "timeouts.connect": 0.5, "policy.name": "round_robin"},
            )
            async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
                await wait_for(lambda: all(b.routable for b in balancer.components.registry), timeout=5)
                await jammed.stop()
                with socket.socket() as listener:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind(("127.0.0.1", jammed_port))
                    listener.listen(0)
                    fillers = _fill_accept_queue(jammed_port)
                    try:
                        for _ in range(2):  # round robin: one of the two goes to the jammed server first
                            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                                assert reply.status == 200, await reply.text()
                                await reply.read()
                        backend = balancer.components.registry.get("jammed")
                        assert backend is not None and backend.state is BackendState.UNHEALTHY
                        assert "timeout" in (backend.traffic.last_error or "").lower()
                    finally:
                        for filler in fillers:
                            filler.close()


async def test_backend_5xx_is_retried_on_the_other_backend() -> None:
    async with run_fake_fleet(2) as (broken, sound):
        broken.set_fault("error_500")
        config = make_config([broken.url, sound.url], **{"policy.name": "round_robin"})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            for _ in range(4):
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    assert reply.status == 200, await reply.text()
                    assert (await reply.json())["choices"]
            assert broken.stats["faults_applied"] >= 1  # it was tried, and answered 500
            assert sound.stats["completed"] == 4


async def test_a_lone_backends_5xx_reaches_the_client_as_it_was_sent() -> None:
    async with run_fake_llama() as fake:
        fake.set_fault("error_500", status=500, message="boom")
        async with (
            run_balancer(make_config([fake.url])) as balancer,
            aiohttp.ClientSession() as session,
            session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply,
        ):
            assert reply.status == 500
            assert (await reply.json())["error"]["message"] == "boom"


async def test_backend_dying_mid_stream_ends_it_with_an_error_event_never_replayed() -> None:
    async with run_fake_fleet(2) as fakes:
        config = make_config([f.url for f in fakes], **{"policy.name": "round_robin"})
        async with run_balancer(config) as balancer:
            for fake in fakes:
                fake.set_fault("crash_mid_stream", after_tokens=3)
            client = openai.AsyncOpenAI(base_url=balancer.url + "/v1", api_key="x", max_retries=0, timeout=10)
            async with client:
                stream = await client.chat.completions.create(
                    model="smollm2", messages=CHAT["messages"], max_tokens=16, stream=True  # type: ignore[arg-type]
                )
                received = []
                with pytest.raises(openai.APIError) as raised:
                    async for chunk in stream:
                        received.append(chunk)
                assert received  # the stream had started: this could not be retried
                assert "mid-stream" in raised.value.message or "after the response started" in raised.value.message
                # Exactly one backend ever saw it.
                assert sum(f.stats["requests"].get("/v1/chat/completions", 0) for f in fakes) == 1
                for fake in fakes:
                    fake.clear_fault()
                reply = await client.chat.completions.create(
                    model="smollm2", messages=CHAT["messages"], max_tokens=4  # type: ignore[arg-type]
                )
                assert reply.choices[0].message.content


async def test_mid_stream_error_event_ends_the_stream_and_the_connection_stays_usable() -> None:
    async with run_fake_llama() as fake:
        fake.set_fault("crash_mid_stream", after_tokens=2)
        async with run_balancer(make_config([fake.url])) as balancer:
            payload = json.dumps({**CHAT, "stream": True}).encode()
            request = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            try:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                # The whole chunked body, up to its terminator, bounded in time.
                chunked = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 10)
                fake.clear_fault()
                writer.write(request)  # the same connection, at once, as a pooling client does
                again = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            finally:
                writer.close()
                await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower() and b"connection: close" not in head.lower()
    body = _dechunk(chunked)
    events = [e for e in body.split(b"\n\n") if e]
    assert events[0].startswith(b"data: {")
    last = events[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = json.loads(last.split(b"data: ", 1)[1])["error"]
    assert error["code"] == "upstream_stream_broken" and error["type"] and error["message"]
    assert b"[DONE]" not in body
    assert again.startswith(b"HTTP/1.1 200")


async def test_a_pooled_client_reuses_its_connection_right_after_a_mid_stream_death() -> None:
    async with run_fake_llama() as fake, run_balancer(make_config([fake.url])) as balancer:
        connector = aiohttp.TCPConnector(limit=1)  # every request on the one pooled connection
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(10):
                fake.set_fault("crash_mid_stream", after_tokens=2)
                async with session.post(balancer.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    assert b"event: error" in await r.read()
                fake.clear_fault()
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    assert reply.status == 200
                    await reply.read()


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2:]
    return b"".join(out)


async def test_backend_dropping_the_connection_before_any_byte_is_retried_on_the_other() -> None:
    async with run_fake_fleet(2) as (dropping, sound):
        dropping.set_fault("close_immediately")
        config = make_config([dropping.url, sound.url], **{"policy.name": "round_robin"})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            for _ in range(4):
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    assert reply.status == 200, await reply.text()
            assert dropping.stats["faults_applied"] >= 1
            assert sound.stats["completed"] == 4


async def test_a_connection_dropped_before_any_byte_is_tried_again_even_on_a_lone_backend() -> None:
    # What a pooled keep-alive connection closed by the backend just as it is reused looks like.
    async with run_fake_llama() as fake:
        fake.set_fault("close_immediately", count=1)
        async with (
            run_balancer(make_config([fake.url])) as balancer,
            aiohttp.ClientSession() as session,
            session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply,
        ):
            assert reply.status == 200, await reply.text()
            assert fake.stats["faults_applied"] == 1
            assert balancer.components.registry.backends[0].traffic.errors_total == 0


async def test_the_retry_of_a_dropped_pooled_connection_does_not_use_up_an_attempt() -> None:
    # Two attempts, and the policy sends this user to the dropping backend twice (the free retry, then
    # the attempt that blames it): the second attempt proper must still reach the sound backend.
    from llmbalancer.scheduling.selectors.hash import stable_weight

    async with run_fake_fleet(2) as (dropping, sound):
        dropping.set_fault("close_immediately")
        config = make_config(
            [f"{dropping.url}=dropping", f"{sound.url}=sound"],
            **{"policy.name": "hash", "policy.hash_key": "header:X-User", "retries.attempts": 2},
        )
        users = (f"user{i}" for i in range(1000))
        user = next(u for u in users if stable_weight(u, "dropping") > stable_weight(u, "sound"))
        async with (
            run_balancer(config) as balancer,
            aiohttp.ClientSession() as session,
            session.post(balancer.url + "/v1/chat/completions", json=CHAT, headers={"X-User": user}) as reply,
        ):
            assert reply.status == 200, await reply.text()
            assert dropping.stats["faults_applied"] == 2
            assert sound.stats["completed"] == 1
