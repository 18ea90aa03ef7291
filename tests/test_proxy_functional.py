"""The proxy against real llama-servers: disconnects, refused backends, stale pooled connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from llmbalancer.fleet.backend import BackendState
from llmbalancer.relay.access import Access
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet, run_fake_llama
from tests.support import (
    LlamaServer,
    get_json,
    make_config,
    run_balancer,
    start_llama_server,
    wait_for,
    wait_ready,
)

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


async def _slots_busy(session: aiohttp.ClientSession, url: str) -> bool:
    slots: list[dict[str, Any]] = await get_json(session, url + "/slots")
    return any(slot["is_processing"] for slot in slots)


async def test_client_disconnect_mid_stream_frees_the_real_backend_slot_within_a_second(
    llama_fleet: list[LlamaServer],
) -> None:
    server = llama_fleet[1]
    long_stream = {**CHAT, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    async with run_balancer(make_config([server.url])) as balancer, aiohttp.ClientSession() as session:
        reply = await session.post(balancer.url + "/v1/chat/completions", json=long_stream)
        try:
            assert reply.status == 200
            first = await reply.content.readline()
            assert first.startswith(b"data: ")
            assert await _slots_busy(session, server.url)
        finally:
            reply.close()  # hang up mid-stream: drops the connection
        hung_up = time.monotonic()
        while await _slots_busy(session, server.url):
            assert time.monotonic() - hung_up < 1.0, "backend slot still busy a second after the client left"
            await asyncio.sleep(0.02)
        # The claim was released too: nothing is counted in flight any more.
        assert [b.traffic.in_flight for b in balancer.components.registry] == [0]


async def test_refused_backend_is_retried_on_the_other_marked_unhealthy_and_rejoins_when_ready() -> None:
    async with run_fake_fleet(2) as (sound, dying):
        config = make_config(
            [sound.url, f"{dying.url}=dying"], **{"health.interval": 1.0, "policy.name": "round_robin"}
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            registry = balancer.components.registry
            backend = registry.get("dying")
            assert backend is not None and backend.state is BackendState.HEALTHY
            accesses: list[Access] = []
            balancer.components.proxy.on_complete.append(accesses.append)

            # Let the poller's own first probe finish: a crashed process resets every connection, but a
            # probe caught half-accepted by the stopping fake would hang for timeouts.health instead.
            for _ in range(100):
                if dying.stats["requests"].get("/health", 0) >= 2:
                    break
                await asyncio.sleep(0.01)
            # Gone, as a crashed process: its port refuses connections, and the balancer, whose next
            # probe is up to a second away, still counts it routable.
            await dying.stop()
            for _ in range(4):
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    assert reply.status == 200, await reply.text()
                if backend.traffic.errors_total:
                    break
            assert backend.traffic.errors_total == 1
            assert backend.state is BackendState.UNHEALTHY
            retried = [a for a in accesses if a.attempts > 1]
            assert len(retried) == 1 and retried[0].status == 200 and retried[0].backend == sound.url.split("//")[1]

            await dying.start()  # the same port again
            ready = time.monotonic()
            while backend.state is not BackendState.HEALTHY:
                assert time.monotonic() - ready < 1.5, f"not back in rotation: {backend.state}"
                await asyncio.sleep(0.02)
            async with session.get(balancer.url + "/health") as reply:
                assert (await reply.json())["backends_healthy"] == 2


async def test_stale_pooled_connection_never_surfaces_as_a_client_error(llama_fleet: list[LlamaServer]) -> None:
    # llama-server closes idle keep-alive connections after 5 s; the second request comes just after.
    async with run_balancer(make_config([llama_fleet[0].url])) as balancer, aiohttp.ClientSession() as session:
        for pause in (0.0, 5.5):
            await asyncio.sleep(pause)
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200, await reply.text()
                assert (await reply.json())["choices"]


async def test_forwarding_headers_request_id_and_hop_by_hop_stripping() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        sent = {
            "X-Request-ID": "client-chosen-42",
            "X-Forwarded-For": "10.9.9.9",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "hop",
            "Keep-Alive": "timeout=30",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "TE": "trailers",
            "X-Keep-Me": "end-to-end",
        }
        async with session.post(balancer.url + "/v1/chat/completions", json=CHAT, headers=sent) as reply:
            assert reply.status == 200
            assert reply.headers["X-Request-ID"] == "client-chosen-42"
            # The backend's own hop-by-hop headers do not pass either.
            assert reply.headers.get("Keep-Alive") is None
        seen = fake.stats["last_by_path"]["/v1/chat/completions"]["headers"]
        assert seen["x-request-id"] == "client-chosen-42"
        assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-keep-me"] == "end-to-end"
        for hop in ("x-drop-me", "keep-alive", "proxy-authorization", "te"):
            assert hop not in seen, hop
        assert "x-drop-me" not in seen.get("connection", "").lower()

        async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
            assert reply.status == 200
            generated = reply.headers["X-Request-ID"]
        assert len(generated) >= 16
        assert fake.stats["last_by_path"]["/v1/chat/completions"]["headers"]["x-request-id"] == generated


async def test_client_leaving_before_the_first_byte_releases_its_claim_and_aborts_the_upstream_request() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        fake.set_fault("hang")  # the backend takes the request and sends nothing yet
        backend = balancer.components.registry.backends[0]
        waiting = asyncio.create_task(session.post(balancer.url + "/v1/chat/completions", json=CHAT))
        for _ in range(200):
            if fake.stats["requests"].get("/v1/chat/completions"):
                break
            await asyncio.sleep(0.01)
        assert backend.traffic.in_flight == 1
        waiting.cancel()  # the client hangs up before any byte came back
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        left = time.monotonic()
        while backend.traffic.in_flight:
            assert time.monotonic() - left < 1.0, "claim still held after the client left"
            await asyncio.sleep(0.01)
        # Had the upstream request stayed open, lifting the hang would let the backend answer it.
        fake.clear_fault()
        await asyncio.sleep(0.2)
        assert fake.stats["completed"] == 0


async def test_one_access_event_per_request_with_its_facts() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        with structlog.testing.capture_logs() as logs:
            async with session.post(
                balancer.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-ID": "r-1"}
            ) as reply:
                body = await reply.read()
    events = [e for e in logs if e["event"] == "request"]
    assert len(events) == 1
    event = events[0]
    assert event["request_id"] == "r-1"
    assert (event["method"], event["path"], event["model"], event["status"]) == (
        "POST", "/v1/chat/completions", "smollm2", 200
    )
    assert event["backend"] == fake.url.split("//")[1]
    assert event["bytes"] == len(body)
    assert 0 <= event["queue_ms"] <= event["ttfb_ms"] <= event["duration_ms"]


async def test_clients_that_hang_up_mid_stream_never_count_against_the_backend() -> None:
    async with run_fake_llama(FakeLlamaConfig(token_delay=0.01)) as fake:
        config = make_config([fake.url], **{"circuit.failures": 2})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            accesses: list[Access] = []
            balancer.components.proxy.on_complete.append(accesses.append)
            stream = {**CHAT, "max_tokens": 500, "stream": True}
            for _ in range(4):
                reply = await session.post(balancer.url + "/v1/chat/completions", json=stream)
                try:
                    assert reply.status == 200
                    assert (await reply.content.readline()).startswith(b"data: ")
                finally:
                    reply.close()
            await wait_for(lambda: len(accesses) == 4, timeout=5.0)
            (backend,) = balancer.components.registry
            assert {a.error for a in accesses} == {"client_closed"}
            assert backend.traffic.errors_total == 0 and backend.state is BackendState.HEALTHY
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200


async def test_a_client_that_stops_reading_is_cut_off_after_the_idle_timeout_and_the_slot_freed() -> None:
    # Tokens of 4 KiB each and no delay: the stream outruns a client that reads nothing, the socket
    # buffers fill, and the balancer's writes wait on the client, not on the backend.
    word = "x" * 4096
    async with run_fake_llama(FakeLlamaConfig(reply=f"{word} {word}")) as fake:
        config = make_config([fake.url], **{"timeouts.idle": 0.5})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            accesses: list[Access] = []
            balancer.components.proxy.on_complete.append(accesses.append)
            body = json.dumps({**CHAT, "max_tokens": 20000, "stream": True, "ignore_eos": True}).encode()
            with socket.socket() as stalled:
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.connect(("127.0.0.1", balancer.port))
                stalled.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                )
                await wait_for(lambda: bool(accesses), timeout=10.0)
                (access,) = accesses
                assert access.error == "client_stalled" and access.status == 200
                (backend,) = balancer.components.registry
                assert backend.traffic.errors_total == 0 and backend.state is BackendState.HEALTHY
                started = time.monotonic()
                while await _slots_busy(session, fake.url):
                    assert time.monotonic() - started < 1.0, "the backend's slot is still busy"
                    await asyncio.sleep(0.02)


async def test_requests_sent_to_a_real_server_that_hangs_are_answered_by_the_other(
    llama_fleet: list[LlamaServer], tmp_path: Path
) -> None:
    # SIGSTOP: the kernel still accepts connections for it, and nothing answers, /health included.
    hanging = start_llama_server(tmp_path, slots=1)
    try:
        wait_ready(hanging.url)
        config = make_config(
            [f"{llama_fleet[0].url}=sound", f"{hanging.url}=hanging"],
            **{"health.interval": 0.2, "timeouts.health": 0.5, "policy.name": "round_robin"},
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            await wait_for(lambda: all(b.routable for b in balancer.components.registry), timeout=10)
            os.kill(hanging.process.pid, signal.SIGSTOP)
            try:

                async def chat() -> int:
                    async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                        await reply.read()
                        return reply.status

                statuses = await asyncio.wait_for(asyncio.gather(*(chat() for _ in range(4))), timeout=30)
                assert statuses == [200] * 4
                backend = balancer.components.registry.get("hanging")
                assert backend is not None and backend.state is BackendState.UNHEALTHY
            finally:
                os.kill(hanging.process.pid, signal.SIGCONT)
    finally:
        hanging.stop()
