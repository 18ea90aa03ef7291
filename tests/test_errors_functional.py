"""Every status the balancer answers itself, each with its OpenAI-style JSON body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from llmbalancer.backend import BackendState
from tests.support import LlamaServer, free_port, make_config, run_balancer

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
