"""The official ``ollama`` client through llmbalancer in front of real llama-servers: one chat server, one
started with ``--embeddings`` (its own model name, so that embedding requests are routed to it)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest

from llmbalancer.testing.fake_ollama import FakeOllamaConfig, run_fake_ollama
from tests.support import LlamaServer, make_config, run_balancer, start_llama_server, wait_for, wait_ready

HELLO = [{"role": "user", "content": "Say hello to the world in a sentence."}]
EMBED_MODEL = "smollm2-embed"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LlamaServer, LlamaServer]]:
    tmp = Path(tmp_path_factory.mktemp("ollama-real"))
    chat = start_llama_server(tmp)
    embed = start_llama_server(tmp, alias=EMBED_MODEL, extra=("--embeddings", "--pooling", "mean"))
    try:
        wait_ready(chat.url)
        wait_ready(embed.url)
        yield chat, embed
    finally:
        chat.stop()
        embed.stop()


async def _counters(server: LlamaServer) -> dict[str, float]:
    """The server's own token counters (/metrics): prompt tokens evaluated, tokens generated."""
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as reply:
        text = await reply.text()
    found = re.findall(r"^llamacpp:(prompt_tokens_total|tokens_predicted_total)\s+([0-9.eE+-]+)", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


async def _served_by(server: LlamaServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/v1/models") as reply:
        answer: dict[str, Any] = await reply.json()
    return answer["data"][0]


async def test_list_and_ps_describe_each_servers_model_from_what_it_reports(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    chat, embed = servers
    meta = (await _served_by(chat))["meta"]
    config = make_config([chat.url, embed.url])
    async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
        listed = {m.model: m for m in (await client.list()).models}
        assert set(listed) == {"smollm2", EMBED_MODEL}
        smol = listed["smollm2"]
        assert smol.size == meta["size"] and smol.details is not None
        assert smol.details.parameter_size == "134.52M" and smol.details.quantization_level == meta["ftype"]
        assert smol.details.format == "gguf"
        assert smol.modified_at is None and smol.digest is None  # unknown, never made up
        running = {m.model: m for m in (await client.ps()).models}
        assert set(running) == {"smollm2", EMBED_MODEL}
        assert running["smollm2"].context_length == meta["n_ctx"] == 2048
        assert running["smollm2"].size_vram is None and running["smollm2"].expires_at is None


async def test_show_tells_the_context_and_chat_template_the_server_reports(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    chat, _ = servers
    async with aiohttp.ClientSession() as session, session.get(chat.url + "/props") as reply:
        props = await reply.json()
    async with run_balancer(make_config([chat.url])) as balancer, ollama.AsyncClient(host=balancer.url) as client:
        shown = await client.show("smollm2")
        assert shown.template == props["chat_template"]
        assert shown.parameters == "num_ctx 2048"
        assert shown.modelinfo is not None and shown.modelinfo["general.context_length"] == 2048
        assert shown.capabilities == ["completion"]  # the template supports no tools, the server takes no images
        assert shown.details is not None and shown.details.parameter_size == "134.52M"
        with pytest.raises(ollama.ResponseError) as missing:
            await client.show("nowhere")
        assert missing.value.status_code == 404 and "smollm2" in missing.value.error


async def test_a_streamed_chat_arrives_token_by_token_and_ends_with_the_servers_own_counts(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    chat, _ = servers
    async with run_balancer(make_config([chat.url])) as balancer:
        before = await _counters(chat)

        def stream() -> list[tuple[float, ollama.ChatResponse]]:
            with ollama.Client(host=balancer.url) as client:
                parts = client.chat("smollm2", HELLO, stream=True, options={"num_predict": 48, "temperature": 0})
                return [(time.monotonic(), part) for part in parts]

        arrived = await asyncio.to_thread(stream)
        after = await _counters(chat)
    parts = [part for _, part in arrived]
    final = parts[-1]
    assert final.done and final.done_reason in ("stop", "length") and not any(p.done for p in parts[:-1])
    # The server's own counters moved by exactly what the final line says (its timings).
    assert final.prompt_eval_count == after["prompt_tokens_total"] - before["prompt_tokens_total"]
    assert final.eval_count == after["tokens_predicted_total"] - before["tokens_predicted_total"]
    assert final.prompt_eval_duration and final.eval_duration and final.total_duration
    assert final.total_duration >= final.eval_duration
    # One line per token generated (the end-of-generation token is counted, not sent), each as it came.
    tokens = parts[:-1]
    assert all(p.message.content for p in tokens) and final.eval_count - 1 <= len(tokens) <= final.eval_count
    assert arrived[-2][0] - arrived[0][0] > 0.3 * final.eval_duration / 1e9


async def test_a_chat_not_streamed_is_one_object_with_the_servers_counts(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    chat, _ = servers
    async with run_balancer(make_config([chat.url])) as balancer, ollama.AsyncClient(host=balancer.url) as client:
        before = await _counters(chat)
        reply = await client.chat("smollm2", HELLO, options={"num_predict": 12, "seed": 7})
        after = await _counters(chat)
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count == after["tokens_predicted_total"] - before["tokens_predicted_total"] <= 12
    assert reply.prompt_eval_count == after["prompt_tokens_total"] - before["prompt_tokens_total"]


async def test_generate_streamed_and_not_raw_and_templated(servers: tuple[LlamaServer, LlamaServer]) -> None:
    chat, _ = servers
    async with run_balancer(make_config([chat.url])) as balancer, ollama.AsyncClient(host=balancer.url) as client:
        options = {"num_predict": 6, "temperature": 0}
        whole = await client.generate("smollm2", "The capital of France is", raw=True, options=options)
        parts = [p async for p in await client.generate("smollm2", "The capital of France is", raw=True,
                                                         options=options, stream=True)]
        assert whole.done and whole.eval_count == 6 and whole.done_reason == "length"
        assert "".join(p.response for p in parts) == whole.response  # temperature 0: the same text
        assert len(parts) == 7 and parts[-1].done and parts[-1].eval_count == 6
        templated = await client.generate("smollm2", "Name a colour.", system="Answer in one word.", options=options)
        assert templated.done and templated.response
        loaded = await client.generate("smollm2")  # no prompt: Ollama's "load the model"
        assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


async def test_embed_and_the_older_embeddings_reach_the_embedding_server(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    chat, embed = servers
    config = make_config([chat.url, embed.url])
    async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
        embedded = await client.embed(EMBED_MODEL, ["hello", "the world"])
        assert len(embedded.embeddings) == 2 and all(len(v) == 576 for v in embedded.embeddings)
        assert embedded.embeddings[0] != embedded.embeddings[1] and embedded.prompt_eval_count
        single = await client.embeddings(EMBED_MODEL, "hello")
        assert len(single.embedding) == 576
        # The chat-only server says it has no embeddings: its message, Ollama's shape, its status.
        with pytest.raises(ollama.ResponseError) as refused:
            await client.embed("smollm2", "hello")
        assert refused.value.status_code == 501 and "--embeddings" in refused.value.error


async def test_format_json_and_a_schema_constrain_the_answer(servers: tuple[LlamaServer, LlamaServer]) -> None:
    chat, _ = servers
    async with run_balancer(make_config([chat.url])) as balancer, ollama.AsyncClient(host=balancer.url) as client:
        options = {"num_predict": 40, "temperature": 0}
        reply = await client.chat(
            "smollm2", [{"role": "user", "content": "A JSON object with a name."}], format="json", options=options
        )
        assert reply.message.content is not None and reply.message.content.lstrip().startswith("{")
        schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["a"], "additionalProperties": False}
        reply = await client.chat("smollm2", [{"role": "user", "content": "Pick a digit."}], format=schema,
                                  options=options)
        assert reply.done_reason == "stop" and set(json.loads(reply.message.content or "")) == {"a"}


async def test_errors_are_ollamas_unknown_models_refused_options_and_the_servers_own(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    chat, _ = servers
    async with run_balancer(make_config([chat.url])) as balancer, ollama.AsyncClient(host=balancer.url) as client:
        with pytest.raises(ollama.ResponseError) as unknown:
            await client.chat("llama3", HELLO)
        assert unknown.value.status_code == 404 and "llama3" in unknown.value.error
        assert "smollm2" in unknown.value.error  # names what is served
        with pytest.raises(ollama.ResponseError) as refused:
            await client.chat("smollm2", HELLO, options={"tfs_z": 0.5})
        assert refused.value.status_code == 400 and "tfs_z" in refused.value.error
        assert (await client.chat("smollm2", HELLO, options={"tfs_z": 1.0, "num_predict": 2})).done  # no effect: fine
        pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAAAAgABVKJPXQAAAABJRU5ErkJggg=="
        with pytest.raises(ollama.ResponseError) as no_vision:
            await client.chat("smollm2", [{"role": "user", "content": "What is it?", "images": [pixel]}])
        assert no_vision.value.status_code == 500 and "image input is not supported" in no_vision.value.error


async def test_a_mixed_fleet_serves_every_call_from_both_ollama_and_llama_server(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    chat, embed = servers
    fake = FakeOllamaConfig(models=("smollm2:latest", f"{EMBED_MODEL}:latest"))
    async with run_fake_ollama(fake) as ollama_backend:
        urls = [f"{ollama_backend.url}=ollama", f"{chat.url}=llama", f"{embed.url}=llama-embed"]
        config = make_config(urls, **{"policy.name": "round_robin"})
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            registry = balancer.components.registry
            await wait_for(lambda: all(b.health.served_models for b in registry))
            assert registry.get("ollama").health.detected_kind == "ollama"  # type: ignore[union-attr]
            # One entry per model, whichever kind of backend serves it.
            assert sorted(m.model or "" for m in (await client.list()).models) == [
                f"{EMBED_MODEL}:latest", "smollm2:latest"
            ]
            assert len((await client.ps()).models) == 2
            shown = [await client.show("smollm2") for _ in range(2)]  # round robin: one of each kind
            assert sorted("llmbalancer" in (s.modelfile or "") for s in shown) == [False, True]
            # Greedy: with llama.cpp's default sampling an answer now and then ends at once or holds tokens back
            # (a possible stop string), and a stream of 4 tokens came as fewer than 2 lines.
            options = {"num_predict": 4, "temperature": 0}
            replies = [await client.chat("smollm2", HELLO, options=options) for _ in range(2)]
            assert all(r.done and r.message.content for r in replies)
            parts = [[p async for p in await client.chat("smollm2", HELLO, options=options, stream=True)]
                     for _ in range(2)]
            assert all(ps[-1].done and len(ps) > 2 for ps in parts)
            generated = [await client.generate("smollm2", "Hello", options=options) for _ in range(2)]
            assert all(g.done and g.response for g in generated)
            streamed = [[p async for p in await client.generate("smollm2", "Hello", options=options, stream=True)]
                        for _ in range(2)]
            assert all(ps[-1].done for ps in streamed)
            embedded = [await client.embed(EMBED_MODEL, ["a", "b"]) for _ in range(2)]
            assert sorted(len(e.embeddings[0]) for e in embedded) == [3, 576]  # the fake's vectors, the server's
        # Both kinds served each call: Ollama as the client sent it, llama-server translated (round robin: half each).
        assert dict(ollama_backend.served) == {"smollm2:latest": 4, f"{EMBED_MODEL}:latest": 1}
        llama = registry.get("llama")
        assert llama is not None and llama.traffic.requests_total == 1 + 4  # a show, two chats, two generates
