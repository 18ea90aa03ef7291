"""Model routing end to end: the official openai SDK through llmbalancer to fake Ollamas serving
different models (their OpenAI-compatible API echoes the model name each backend was sent)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llmbalancer.config import Config
from llmbalancer.fleet.backend import BackendState
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_llama
from tests.model_fleet import config_file, dead_url, fake_ollamas
from tests.support import get_json, run_balancer, wait_for

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]


def _alpha_beta(tmp_path: Path, a_url: str, b_url: str) -> Config:
    return config_file(
        tmp_path, [{"url": a_url, "name": "a", "models": ["alpha"]}, {"url": b_url, "name": "b", "models": ["beta"]}]
    )


def _client_kwargs(url: str) -> dict[str, Any]:
    return {"base_url": url + "/v1", "api_key": "unused", "max_retries": 0, "timeout": 30.0}


async def test_two_models_on_different_backends_each_reach_only_their_own_with_sync_and_async_sdk(
    tmp_path: Path,
) -> None:
    async with fake_ollamas(["alpha"], ["beta"]) as (a, b):
        config = _alpha_beta(tmp_path, a.url, b.url)
        async with run_balancer(config) as balancer:

            def sync_calls() -> list[str]:
                with openai.OpenAI(**_client_kwargs(balancer.url)) as client:
                    seen = []
                    for model in ("alpha", "beta", "alpha", "beta"):
                        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
                        seen.append(reply.model)
                        stream = client.chat.completions.create(
                            model=model, messages=MESSAGES, max_tokens=4, stream=True
                        )
                        seen.extend({chunk.model for chunk in stream})
                    return seen

            assert await asyncio.to_thread(sync_calls) == ["alpha", "alpha", "beta", "beta"] * 2
            async with openai.AsyncOpenAI(**_client_kwargs(balancer.url)) as client:
                for model in ("beta", "alpha", "beta", "alpha"):
                    reply = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
                    assert reply.model == model
                    stream = await client.chat.completions.create(
                        model=model, messages=MESSAGES, max_tokens=4, stream=True
                    )
                    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                    assert text.startswith("Hello")
            # Round robin alone would have split each model across both; routing kept them apart.
            assert dict(a.served) == {"alpha": 8}
            assert dict(b.served) == {"beta": 8}


async def test_unknown_model_is_a_404_that_names_the_models_served(tmp_path: Path) -> None:
    async with fake_ollamas(["alpha"], ["beta"]) as (a, b):
        config = _alpha_beta(tmp_path, a.url, b.url)
        async with run_balancer(config) as balancer, openai.AsyncOpenAI(**_client_kwargs(balancer.url)) as client:
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(model="gamma", messages=MESSAGES)
            assert caught.value.code == "model_not_found"
            assert "gamma" in caught.value.message and "alpha, beta" in caught.value.message
            assert not a.served and not b.served


async def test_regex_routes_decide_in_order_and_the_fallback_takes_unmatched_models(tmp_path: Path) -> None:
    names = ["gpt-4o", "llama3", "llama3-instruct", "mistral"]
    async with fake_ollamas(names, names, names) as (a, b, c):
        config = config_file(
            tmp_path,
            [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}, {"url": c.url, "name": "c"}],
            routing={"models": {"gpt-.*": ["a"], "llama3-instruct": ["c"], "llama3.*": ["b", "c"]}, "fallback": "c"},
        )
        async with run_balancer(config) as balancer, openai.AsyncOpenAI(**_client_kwargs(balancer.url)) as client:
            for model in ["gpt-4o"] * 2 + ["llama3"] * 4 + ["llama3-instruct"] * 2 + ["mistral"] * 2:
                reply = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
                assert reply.model == model
            assert dict(a.served) == {"gpt-4o": 2}
            assert dict(b.served) == {"llama3": 2}
            assert dict(c.served) == {"llama3": 2, "llama3-instruct": 2, "mistral": 2}


async def test_instance_aliases_share_the_load_and_each_backend_is_sent_its_own_name(tmp_path: Path) -> None:
    async with fake_ollamas(["smol"], ["smol-2"], ["smol-3"]) as fakes:
        config = config_file(
            tmp_path,
            [{"url": f.url, "name": f"n{i}", "models": list(f.ollama.models)} for i, f in enumerate(fakes)],
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            for _ in range(6):
                async with session.post(
                    balancer.url + "/v1/chat/completions", json={"model": "smol", "messages": MESSAGES}
                ) as reply:
                    assert reply.status == 200, await reply.text()
            assert [dict(f.served) for f in fakes] == [{"smol": 2}, {"smol-2": 2}, {"smol-3": 2}]
            # To clients it is one model.
            listing = await get_json(session, balancer.url + "/v1/models")
            assert [m["id"] for m in listing["data"]] == ["smol"]


async def test_v1_models_merges_backends_lists_once_each_and_drops_unhealthy_backends(tmp_path: Path) -> None:
    async with fake_ollamas(["alpha", "shared"], ["beta", "shared", "alpha-2"]) as (a, b):
        config = config_file(
            tmp_path,
            [
                {"url": a.url, "name": "a"},
                {"url": b.url, "name": "b", "models": ["declared"]},
                {"url": dead_url(), "name": "dead", "models": ["gamma"]},
            ],
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            listing = await get_json(session, balancer.url + "/v1/models")
            assert listing["object"] == "list"
            assert [m["id"] for m in listing["data"]] == ["alpha", "shared", "declared", "beta"]
            assert all(m["object"] == "model" for m in listing["data"])

            await b.stop()
            backend_b = balancer.components.registry.get("b")
            assert backend_b is not None
            await wait_for(lambda: backend_b.state is BackendState.UNHEALTHY)
            listing = await get_json(session, balancer.url + "/v1/models")
            assert [m["id"] for m in listing["data"]] == ["alpha", "shared"]


async def test_models_discovered_by_the_poller_route_llama_cpp_native_completion_too(tmp_path: Path) -> None:
    # No models declared: each fake llama-server's /v1/models names its alias, and routing follows it.
    async with run_fake_llama(FakeLlamaConfig(alias="alpha")) as a, run_fake_llama(FakeLlamaConfig(alias="beta")) as b:
        config = config_file(tmp_path, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}])
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            registry = balancer.components.registry
            await wait_for(lambda: [backend.health.served_models for backend in registry] == [("alpha",), ("beta",)])
            for _ in range(3):
                async with session.post(
                    balancer.url + "/completion", json={"model": "beta", "prompt": "Hi", "n_predict": 2}
                ) as reply:
                    assert reply.status == 200, await reply.text()
            assert a.stats["requests"].get("/completion", 0) == 0
            assert b.stats["requests"]["/completion"] == 3
            async with openai.AsyncOpenAI(**_client_kwargs(balancer.url)) as client:
                assert sorted([m.id async for m in client.models.list()]) == ["alpha", "beta"]
