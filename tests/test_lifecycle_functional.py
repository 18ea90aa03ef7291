"""`python -m llmbalancer serve` as a child process: SIGTERM drains, a second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import aiohttp
import pytest

from tests.support import LlamaServer, balancer_process, free_port

LONG_STREAM = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 120,
    "ignore_eos": True,
    "stream": True,
}


async def _serve(backend: LlamaServer) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    # The flag beats the environment: the child must listen on `port`, not on the env's.
    child = balancer_process(
        ["serve", "--backend", backend.url, "--port", str(port)],
        env={"LLMBALANCER_PORT": str(free_port()), "LLMBALANCER_LOG_FORMAT": "json"},
    )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            assert child.poll() is None, (child.stdout.read() if child.stdout else b"").decode()
            try:
                async with session.get(url + "/health") as reply:
                    if reply.status == 200:
                        return child, url
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    child.kill()
    child.wait()
    raise TimeoutError("balancer did not come up")


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(timeout=10)
    if child.stdout:
        child.stdout.close()


async def test_sigterm_drains_an_in_flight_stream_to_completion_and_exits_zero(
    llama_fleet: list[LlamaServer],
) -> None:
    child, url = await _serve(llama_fleet[0])
    try:
        async with aiohttp.ClientSession() as session:
            reply = await session.post(url + "/v1/chat/completions", json=LONG_STREAM)
            async with reply:
                assert reply.status == 200
                lines = [await reply.content.readline()]
                child.send_signal(signal.SIGTERM)
                # While draining, nobody new gets in (a fresh connection, not a pooled one).
                refused = False
                for _ in range(100):
                    try:
                        async with aiohttp.ClientSession() as fresh, fresh.get(url + "/health"):
                            pass
                    except aiohttp.ClientConnectionError:
                        refused = True
                        break
                    await asyncio.sleep(0.02)
                assert refused
                assert child.poll() is None, "exited before the stream finished"
                async for line in reply.content:
                    lines.append(line)
        assert lines[0].startswith(b"data: ")
        assert b"data: [DONE]\n" in lines
        assert sum(1 for line in lines if line.startswith(b"data: {")) > 100
        assert await asyncio.to_thread(child.wait, 15) == 0
    finally:
        _stop(child)


async def test_a_second_signal_exits_at_once(llama_fleet: list[LlamaServer]) -> None:
    child, url = await _serve(llama_fleet[0])
    try:
        async with aiohttp.ClientSession() as session:
            stream = {**LONG_STREAM, "max_tokens": 2000}
            reply = await session.post(url + "/v1/chat/completions", json=stream)
            async with reply:
                assert reply.status == 200
                await reply.content.readline()
                child.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                assert child.poll() is None  # draining the long stream
                child.send_signal(signal.SIGINT)
                started = time.monotonic()
                code = await asyncio.to_thread(child.wait, 5)
                assert code != 0
                assert time.monotonic() - started < 5
                # Cut off, not finished: the chunked body ends without its terminator.
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for _ in reply.content:
                        pass
    finally:
        _stop(child)
