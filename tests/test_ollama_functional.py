"""The official ``ollama`` Python client, pointed at llmbalancer, sees one Ollama made of several."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import ollama

import llmbalancer
from llmbalancer.fleet.backend import BackendState
from llmbalancer.testing.fake_ollama import FakeOllamaConfig, run_fake_ollama
from tests.model_fleet import config_file, dead_url, fake_ollamas
from tests.support import run_balancer, wait_for

HELLO = [{"role": "user", "content": "Say hello."}]


async def test_list_and_ps_merge_the_fleet_once_each_hiding_instance_aliases_and_dropping_unhealthy_backends(
    tmp_path: Path,
) -> None:
    async with fake_ollamas(["llama3:latest", "smol:latest"], ["qwen:7b", "smol-2:latest", "llama3:latest"]) as (a, b):
        config = config_file(
            tmp_path,
            [
                {"url": a.url, "name": "a", "kind": "ollama"},
                {"url": b.url, "name": "b", "kind": "ollama"},
                {"url": dead_url(), "name": "dead", "kind": "ollama", "models": ["gone:latest"]},
            ],
        )
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            listed = await client.list()
            assert [m.model for m in listed.models] == ["llama3:latest", "smol:latest", "qwen:7b"]
            assert all(m.details is not None and m.digest for m in listed.models)
            running = await client.ps()
            assert [m.model for m in running.models] == ["llama3:latest", "smol:latest", "qwen:7b"]

            await b.stop()
            backend_b = balancer.components.registry.get("b")
            assert backend_b is not None
            await wait_for(lambda: backend_b.state is BackendState.UNHEALTHY)
            assert [m.model for m in (await client.list()).models] == ["llama3:latest", "smol:latest"]


async def test_show_is_tried_on_the_backends_in_turn_until_one_knows_the_model(tmp_path: Path) -> None:
    # No models declared: both backends are candidates; the first that does not have it says 404.
    async with fake_ollamas(["llama3:latest"], ["qwen:7b"]) as (a, b):
        config = config_file(tmp_path, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}])
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            shown = await client.show("qwen:7b")
            assert shown.modelfile is not None and "FROM qwen:7b" in shown.modelfile
            assert shown.details is not None and shown.details.family == "llama"
            shown = await client.show("llama3")
            assert shown.modelfile is not None and "FROM llama3:latest" in shown.modelfile
            try:
                await client.show("nowhere")
            except ollama.ResponseError as error:
                assert error.status_code == 404
            else:
                raise AssertionError("an unknown model was shown")


async def test_chat_generate_embed_with_sync_and_async_clients_reach_the_backend_serving_the_model(
    tmp_path: Path,
) -> None:
    async with fake_ollamas(["llama3:latest"], ["qwen:7b"]) as (a, b):
        config = config_file(
            tmp_path,
            [
                {"url": a.url, "name": "a", "models": ["llama3:latest"]},
                {"url": b.url, "name": "b", "models": ["qwen:7b"]},
            ],
        )
        async with run_balancer(config) as balancer:
            async with ollama.AsyncClient(host=balancer.url) as client:
                reply = await client.chat(model="qwen:7b", messages=HELLO)
                assert reply.done and reply.message.content == "Hello from the fake Ollama."
                parts = [part async for part in await client.chat(model="llama3", messages=HELLO, stream=True)]
                assert len(parts) > 2 and parts[-1].done and not parts[0].done
                assert "".join(p.message.content or "" for p in parts) == "Hello from the fake Ollama."
                generated = await client.generate(model="qwen:7b", prompt="Hi")
                assert generated.response == "Hello from the fake Ollama."
                embedded = await client.embed(model="qwen:7b", input=["a", "b"])
                assert len(embedded.embeddings) == 2

            def sync_calls() -> list[str]:
                with ollama.Client(host=balancer.url) as client:
                    one = client.chat(model="llama3", messages=HELLO)
                    streamed = "".join(p.message.content or "" for p in client.chat("qwen:7b", HELLO, stream=True))
                    return [one.message.content or "", streamed]

            assert await asyncio.to_thread(sync_calls) == ["Hello from the fake Ollama."] * 2
            # llama3 is sent as the backend names it (llama3:latest); each backend saw only its own.
            assert dict(a.served) == {"llama3:latest": 2}
            assert dict(b.served) == {"qwen:7b": 4}


async def test_ndjson_lines_reach_the_client_while_the_backend_is_still_generating(tmp_path: Path) -> None:
    async with fake_ollamas(["llama3:latest"], token_delay=0.2) as (a,):
        config = config_file(tmp_path, [{"url": a.url, "name": "a"}])
        body = {"model": "llama3", "messages": HELLO, "options": {"num_predict": 5}}
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            async with session.post(balancer.url + "/api/chat", json=body) as reply:
                assert reply.status == 200
                assert reply.headers["Content-Type"].startswith("application/x-ndjson")
                first = json.loads(await reply.content.readline())
                assert first["done"] is False and first["message"]["content"] == "Hello"
                assert a.stats["processing"] == 1  # the rest is still being generated
                lines = [json.loads(line) async for line in reply.content if line.strip()]
            assert lines[-1]["done"] is True and len(lines) == 5


async def test_root_answers_like_ollama_and_version_says_it_is_llmbalancer(tmp_path: Path) -> None:
    async with fake_ollamas(["llama3:latest"]) as (a,):
        config = config_file(tmp_path, [{"url": a.url, "name": "a"}])
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            async with session.get(balancer.url + "/") as reply:
                assert reply.status == 200 and await reply.text() == "Ollama is running"
            async with session.head(balancer.url + "/") as reply:
                assert reply.status == 200
            async with session.get(balancer.url + "/api/version") as reply:
                assert await reply.json() == {"version": llmbalancer.__version__, "server": "llmbalancer"}


async def test_an_ollama_backend_routes_every_installed_model_not_only_those_loaded_now(tmp_path: Path) -> None:
    installed = FakeOllamaConfig(models=("llama3:latest", "qwen:7b"), loaded=("llama3:latest",))
    async with run_fake_ollama(installed) as a, run_fake_ollama(FakeOllamaConfig(models=("phi3:latest",))) as b:
        config = config_file(tmp_path, [{"url": a.url, "name": "a", "kind": "ollama"}, {"url": b.url, "name": "b"}])
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            registry = balancer.components.registry
            await wait_for(lambda: all(backend.health.served_models for backend in registry))
            assert [m.model for m in (await client.ps()).models] == ["llama3:latest", "phi3:latest"]
            reply = await client.chat(model="qwen:7b", messages=HELLO)  # installed on a, not loaded yet
            assert reply.message.content == "Hello from the fake Ollama."
            assert dict(a.served) == {"qwen:7b": 1} and not b.served
