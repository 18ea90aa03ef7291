"""Usage the balancer asks for itself: a plain OpenAI-compatible backend is sent
``stream_options.include_usage`` on streamed completions, its usage chunk feeds the per-backend token
counts, and a client that did not ask for usage never sees that chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
from aiohttp import web

from llmbalancer.fleet.backend import Backend
from llmbalancer.relay.inbound import InboundBody
from llmbalancer.relay.usage_chunk import UsageCut, cut_whole, split_usage, wants_usage, with_usage
from llmbalancer.testing.fake_llama import FakeLlama, FakeLlamaConfig, run_fake_llama
from tests.model_fleet import config_file
from tests.support import free_port, make_config, run_balancer, wait_for

MESSAGES = [{"role": "user", "content": "Say hello."}]
REPLY = "Hello from the fake llama server."

CONTENT = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
FINISH = b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
USAGE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13,'
    b'"prompt_tokens_details":{"cached_tokens":4}}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30.0)


async def _relay_in_pieces(pieces: list[bytes]) -> tuple[list[bytes], UsageCut]:
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    cut = UsageCut(write)
    for piece in pieces:
        await cut.write(piece)
    await cut.finish()
    return written, cut


# --- the cut, on bytes


async def test_the_usage_event_is_cut_wherever_the_stream_is_split_and_complete_events_leave_at_once() -> None:
    stream = CONTENT + CONTENT + FINISH + USAGE + DONE
    for at in range(1, len(stream)):
        first, second = stream[:at], stream[at:]
        written, cut = await _relay_in_pieces([first, second])
        assert b"".join(written) == CONTENT + CONTENT + FINISH + DONE, at
        assert cut.usage == USAGE, at
        # Every event complete in the first read was relayed before the second read came.
        complete = first[: first.rfind(b"\n\n") + 2] if b"\n\n" in first else b""
        relayed_at_once = split_usage(complete)[0]
        if relayed_at_once:
            assert written[0].startswith(relayed_at_once), at


async def test_a_stream_without_a_usage_event_passes_byte_for_byte() -> None:
    # Azure's first chunk has empty choices too, but no usage object: it is content, not ours to drop.
    azure = b'data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n'
    stream = azure + CONTENT + FINISH + DONE
    written, cut = await _relay_in_pieces([stream[:30], stream[30:]])
    assert b"".join(written) == stream
    assert cut.usage == b""


async def test_crlf_framed_events_are_cut_and_an_unfinished_event_is_relayed_at_the_end() -> None:
    crlf = [e.replace(b"\n\n", b"\r\n\r\n") for e in (CONTENT, USAGE, DONE)]
    written, cut = await _relay_in_pieces([crlf[0] + crlf[1][:20], crlf[1][20:] + crlf[2] + b"data: {"])
    assert b"".join(written) == crlf[0] + crlf[2] + b"data: {"
    assert cut.usage == crlf[1]
    assert cut_whole(CONTENT + USAGE + DONE) == CONTENT + DONE


def test_only_streamed_openai_completions_whose_client_did_not_ask_get_usage_asked_for() -> None:
    assert wants_usage("/v1/chat/completions", {"stream": True})
    assert wants_usage("/v1/completions", {"stream": True, "stream_options": {"include_usage": False}})
    assert not wants_usage("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}})
    assert not wants_usage("/v1/chat/completions", {"stream": False})
    assert not wants_usage("/v1/embeddings", {"stream": True})
    assert not wants_usage("/v1/chat/completions", None)
    body = with_usage(InboundBody(b"", None, {"stream": True, "stream_options": {"continuous_usage_stats": False}}))
    assert json.loads(body.data or b"") == {
        "stream": True, "stream_options": {"continuous_usage_stats": False, "include_usage": True}
    }


# --- through the balancer


def _sent_body(fake: FakeLlama, path: str = "/v1/chat/completions") -> dict[str, Any]:
    body: dict[str, Any] = fake.stats["last_by_path"][path]["body"]
    return body


def _tokens(backend: Backend) -> tuple[int, int, int]:
    traffic = backend.traffic
    return traffic.prompt_tokens_total, traffic.completion_tokens_total, traffic.cached_tokens_total


async def test_openai_backend_is_asked_for_usage_a_client_that_did_not_ask_never_sees(tmp_path: Path) -> None:
    async with run_fake_llama(FakeLlamaConfig(plain_openai=True, reply=REPLY)) as fake:
        config = config_file(tmp_path, [{"url": fake.url, "name": "vllm", "kind": "openai"}])
        async with run_balancer(config) as balancer, _client(balancer.url) as client:
            backend = balancer.components.registry.get("vllm")
            assert backend is not None

            stream = await client.chat.completions.create(model="smollm2", messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]
            assert chunks and all(chunk.choices for chunk in chunks)
            assert all(chunk.usage is None for chunk in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
            assert _sent_body(fake)["stream_options"] == {"include_usage": True}
            unasked = _tokens(backend)

            # The same prompt again, asked for by the client: it gets the one usage chunk, untouched.
            stream = await client.chat.completions.create(
                model="smollm2", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            with_usage = [chunk for chunk in chunks if chunk.usage is not None]
            assert len(with_usage) == 1 and with_usage[0].choices == []
            usage = with_usage[0].usage
            assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens == len(REPLY.split())

            # The counts the balancer read from the chunk it cut are the ones the backend reported.
            assert unasked[:2] == (usage.prompt_tokens, usage.completion_tokens)
            totals = _tokens(backend)
            assert totals[:2] == (2 * usage.prompt_tokens, 2 * usage.completion_tokens)
            details = usage.prompt_tokens_details
            assert details is not None and totals[2] == unasked[2] + (details.cached_tokens or 0)
            async with aiohttp.ClientSession() as session, session.get(balancer.url + "/metrics") as reply:
                metrics = await reply.text()
            counted = 'llmbalancer_completion_tokens_total{backend="vllm",model="smollm2"} '
            assert f"{counted}{2 * usage.completion_tokens}" in metrics


async def test_text_completions_get_usage_asked_for_and_cut_too(tmp_path: Path) -> None:
    async with run_fake_llama(FakeLlamaConfig(plain_openai=True, reply=REPLY)) as fake:
        config = config_file(tmp_path, [{"url": fake.url, "name": "vllm", "kind": "openai"}])
        async with run_balancer(config) as balancer, _client(balancer.url) as client:
            stream = await client.completions.create(model="smollm2", prompt="Say hello.", stream=True)
            chunks = [chunk async for chunk in stream]
            assert all(chunk.choices and chunk.usage is None for chunk in chunks)
            assert "".join(c.choices[0].text for c in chunks) == REPLY
            assert _sent_body(fake, "/v1/completions")["stream_options"] == {"include_usage": True}
            backend = balancer.components.registry.get("vllm")
            assert backend is not None and backend.traffic.completion_tokens_total == len(REPLY.split())


async def test_a_llama_cpp_backend_is_not_sent_stream_options_and_its_timings_still_count() -> None:
    async with (
        run_fake_llama(FakeLlamaConfig(reply=REPLY)) as fake,
        run_balancer(make_config([f"{fake.url}=llama"])) as balancer,
        _client(balancer.url) as client,
    ):
        stream = await client.chat.completions.create(model="smollm2", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
        assert "stream_options" not in _sent_body(fake)
        backend = balancer.components.registry.get("llama")
        assert backend is not None and backend.traffic.completion_tokens_total == len(REPLY.split())


async def test_an_auto_backend_found_to_have_only_the_openai_api_is_asked_for_usage() -> None:
    async with (
        run_fake_llama(FakeLlamaConfig(plain_openai=True, reply=REPLY)) as fake,
        run_balancer(make_config([f"{fake.url}=plain"])) as balancer,
        _client(balancer.url) as client,
    ):
        backend = balancer.components.registry.get("plain")
        assert backend is not None
        await wait_for(lambda: backend.health.detected_kind == "openai")
        stream = await client.chat.completions.create(model="smollm2", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
        assert all(chunk.choices for chunk in chunks)
        assert _sent_body(fake)["stream_options"] == {"include_usage": True}
        assert backend.traffic.completion_tokens_total == len(REPLY.split())


@contextlib.asynccontextmanager
async def _splitting_backend(pause: float) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A minimal OpenAI-compatible server whose usage event arrives in two writes, ``pause`` apart."""
    received: list[dict[str, Any]] = []

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "smollm2", "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        received.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(CONTENT + FINISH + USAGE[:40])
        await asyncio.sleep(pause)
        await response.write(USAGE[40:] + DONE)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def test_a_usage_event_split_across_reads_is_cut_and_what_came_before_is_not_held(tmp_path: Path) -> None:
    async with _splitting_backend(pause=2.0) as (url, received):
        config = config_file(tmp_path, [{"url": url, "name": "split", "kind": "openai"}])
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            body = {"model": "smollm2", "messages": MESSAGES, "stream": True}
            async with session.post(balancer.url + "/v1/chat/completions", json=body) as reply:
                # The content and finish events leave before the rest of the usage event arrives.
                first = await asyncio.wait_for(reply.content.readuntil(b"\n\n"), 1.5)
                rest = await reply.read()
            assert first + rest == CONTENT + FINISH + DONE
            assert received[0]["stream_options"] == {"include_usage": True}
            backend = balancer.components.registry.get("split")
            assert backend is not None and _tokens(backend) == (11, 2, 4)


def test_usage_is_asked_for_without_re_encoding_the_body_when_it_has_no_stream_options() -> None:
    data = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "caf\xc3\xa9 \\u00e9"}]}'
    parsed = json.loads(data)
    sent = with_usage(InboundBody(data, None, parsed))
    assert sent.data is not None and sent.data.endswith(data[1:])  # the client's bytes, as they were
    assert json.loads(sent.data) == {**parsed, "stream_options": {"include_usage": True}} == sent.parsed
