"""Ollama requests translated for llama.cpp-shaped and plain OpenAI backends (the fake server), through the
proxy's whole request life: claims, retries before the first byte, disconnects, the access log and metrics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest

from llmbalancer.testing.fake_llama import FakeLlama, FakeLlamaConfig, run_fake_llama
from tests.model_fleet import config_file, dead_url
from tests.support import make_config, run_balancer, wait_for

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
REPLY = "Hello from the fake llama server."


def _sent(fake: FakeLlama, path: str = "/v1/chat/completions") -> dict[str, Any]:
    """The last request the backend received on ``path``, as it received it."""
    body: dict[str, Any] = fake.stats["last_by_path"][path]["body"]
    return body


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_round_trip_through_the_translation(stream: bool) -> None:
    async with (
        run_fake_llama(FakeLlamaConfig(tool_arguments='{"city": "Paris", "unit": "celsius"}')) as fake,
        run_balancer(make_config([fake.url])) as balancer,
        ollama.AsyncClient(host=balancer.url) as client,
    ):
        if stream:
            parts = [p async for p in await client.chat("smollm2", ASK, tools=[WEATHER], stream=True)]
            assert parts[-1].done and parts[-1].done_reason == "stop"
            calls = [c for p in parts for c in p.message.tool_calls or ()]
        else:
            asked = await client.chat("smollm2", ASK, tools=[WEATHER])
            assert asked.done and asked.message.content == ""
            calls = list(asked.message.tool_calls or ())
        assert len(calls) == 1
        call = calls[0].function
        assert call.name == "get_weather" and call.arguments == {"city": "Paris", "unit": "celsius"}
        assert _sent(fake)["tools"] == [WEATHER]

        history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"function": call.model_dump()}]},
                   {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"}]
        answered = await client.chat("smollm2", history, tools=[WEATHER], stream=False)
        assert answered.message.content == REPLY and not answered.message.tool_calls
    # The backend got OpenAI's shapes: the call with its arguments as JSON text and an id, the result tied to it.
    sent = _sent(fake)["messages"]
    assistant, tool = sent[1], sent[2]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert tool == {"role": "tool", "content": "18 degrees and sunny", "tool_call_id": assistant["tool_calls"][0]["id"]}


async def test_ndjson_lines_leave_while_the_backend_is_still_generating() -> None:
    async with (
        run_fake_llama(FakeLlamaConfig(token_delay=0.2)) as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        body = {"model": "smollm2", "messages": ASK, "options": {"num_predict": 5}}
        async with session.post(balancer.url + "/api/chat", json=body) as reply:
            assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/x-ndjson")
            first = json.loads(await reply.content.readline())
            assert first["done"] is False and first["message"] == {"role": "assistant", "content": "Hello"}
            assert fake.stats["processing"] == 1  # the rest is still being generated
            lines = [json.loads(line) async for line in reply.content if line.strip()]
        assert [line["done"] for line in lines] == [False] * 4 + [True]
        assert lines[-1]["eval_count"] == 5 and lines[-1]["done_reason"] == "length"
    assert _sent(fake)["max_tokens"] == 5 and _sent(fake)["stream"] is True


async def test_a_client_that_hangs_up_mid_stream_frees_the_backends_slot() -> None:
    async with (
        run_fake_llama(FakeLlamaConfig(token_delay=0.1)) as fake,
        run_balancer(make_config([fake.url])) as balancer,
    ):
        backend = next(iter(balancer.components.registry))
        async with aiohttp.ClientSession() as session:
            body = {"model": "smollm2", "messages": ASK, "options": {"num_predict": 100}}
            async with session.post(balancer.url + "/api/chat", json=body) as reply:
                await reply.content.readline()
                assert fake.stats["processing"] == 1
        await wait_for(lambda: fake.stats["processing"] == 0 and fake.stats["cancelled"] == 1)
        await wait_for(lambda: backend.traffic.in_flight == 0)
        assert backend.traffic.errors_total == 0  # the client's doing, not the backend's
        await wait_for(lambda: balancer.components.snapshot()["requests"])
        assert balancer.components.snapshot()["requests"][0]["error"] == "client_closed"


async def test_a_failure_before_the_first_byte_is_retried_on_another_backend() -> None:
    async with run_fake_llama() as broken, run_fake_llama() as healthy:
        broken.set_fault("error_500")
        config = make_config([f"{broken.url}=broken", f"{healthy.url}=healthy", f"{dead_url()}=dead"],
                             **{"policy.name": "round_robin"})
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            await wait_for(lambda: balancer.components.registry.get("dead").state.value == "unhealthy")  # type: ignore[union-attr]
            for _ in range(2):
                reply = await client.chat("smollm2", ASK)
                assert reply.message.content == REPLY
            await wait_for(lambda: len(balancer.components.snapshot()["requests"]) == 2)
            recent = balancer.components.snapshot()["requests"]
            assert sorted(r["attempts"] for r in recent) == [1, 2] and all(r["backend"] == "healthy" for r in recent)


async def test_a_plain_openai_backend_is_asked_for_usage_and_its_counts_end_the_stream() -> None:
    async with run_fake_llama(FakeLlamaConfig(plain_openai=True, max_tokens_default=4)) as fake:
        config = make_config([fake.url])
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            await wait_for(lambda: next(iter(balancer.components.registry)).health.detected_kind == "openai")
            parts = [p async for p in await client.chat("smollm2", ASK, stream=True)]
            assert _sent(fake)["stream_options"] == {"include_usage": True}
            final = parts[-1]
            assert final.done and final.eval_count == 4 and final.prompt_eval_count
            assert final.eval_duration is None and final.prompt_eval_duration is None  # usage tells no durations
            assert "".join(p.message.content or "" for p in parts) == "Hello from the fake"
            generated = await client.generate("smollm2", "Once upon a time", raw=True)
            assert generated.response == "Hello from the fake" and generated.eval_count == 4
            assert "prompt" in _sent(fake, "/v1/completions")


async def test_options_reach_each_backend_under_its_own_names_or_are_refused_naming_them() -> None:
    options = {"temperature": 0.2, "top_k": 7, "repeat_penalty": 1.3, "num_predict": 3, "stop": ["\n"],
               "seed": 42, "num_ctx": 8192, "num_gpu": 1}
    async with run_fake_llama() as llama, run_fake_llama(FakeLlamaConfig(plain_openai=True)) as plain:
        config = make_config([f"{llama.url}=llama"])
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            await client.chat("smollm2", ASK, options={**options, "mirostat": 2, "mirostat_tau": 4.0}, keep_alive=0,
                              format="json", think=False)
            sent = _sent(llama)
            assert {k: sent[k] for k in ("temperature", "top_k", "repeat_penalty", "max_tokens", "stop", "seed")} == {
                "temperature": 0.2, "top_k": 7, "repeat_penalty": 1.3, "max_tokens": 3, "stop": ["\n"], "seed": 42
            }
            assert sent["mirostat"] == 2 and sent["mirostat_tau"] == 4.0
            assert sent["response_format"] == {"type": "json_object"}
            assert sent["chat_template_kwargs"] == {"enable_thinking": False}
            assert not {"num_ctx", "num_gpu", "keep_alive", "options", "think", "format"} & set(sent)
        config = make_config([f"{plain.url}=plain"])
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            await wait_for(lambda: next(iter(balancer.components.registry)).health.detected_kind == "openai")
            await client.chat("smollm2", ASK, options=options)
            assert _sent(plain)["repetition_penalty"] == 1.3 and "repeat_penalty" not in _sent(plain)
            with pytest.raises(ollama.ResponseError) as refused:
                await client.chat("smollm2", ASK, options={"mirostat": 2})
            assert refused.value.status_code == 400 and "'mirostat'" in refused.value.error
            assert "plain" in refused.value.error
            await client.chat("smollm2", ASK, options={"mirostat": 0, "typical_p": 1.0})  # changes nothing: sent


async def test_a_stream_the_backend_breaks_off_ends_with_an_ollama_error_line() -> None:
    async with run_fake_llama(FakeLlamaConfig(token_delay=0.01)) as fake:
        fake.set_fault("crash_mid_stream", after_tokens=3)
        async with run_balancer(make_config([fake.url])) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            received: list[ollama.ChatResponse] = []
            with pytest.raises(ollama.ResponseError) as broken:
                async for part in await client.chat("smollm2", ASK, stream=True):
                    received.append(part)
            assert len(received) == 3 and "Backend failed after the response started" in broken.value.error
            backend = next(iter(balancer.components.registry))
            await wait_for(lambda: backend.traffic.in_flight == 0)
            assert backend.traffic.errors_total == 1


async def test_translated_requests_are_logged_and_counted_like_any_other() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        ollama.AsyncClient(host=balancer.url) as client,
    ):
        await client.chat("smollm2", ASK, options={"num_predict": 3})
        [p async for p in await client.generate("smollm2", "Hi", options={"num_predict": 2}, stream=True)]
        await wait_for(lambda: len(balancer.components.snapshot()["requests"]) == 2)
        recent = balancer.components.snapshot()["requests"]
        assert [(r["path"], r["completion_tokens"], r["status"]) for r in recent] == [
            ("/api/generate", 2, 200), ("/api/chat", 3, 200)
        ]
        assert all(r["prompt_tokens"] and r["ttft_s"] is not None for r in recent)
        async with aiohttp.ClientSession() as session, session.get(balancer.url + "/metrics") as reply:
            metrics = await reply.text()
        assert 'llmbalancer_completion_tokens_total{backend="127.0.0.1' in metrics
        backend = next(iter(balancer.components.registry))
        assert backend.traffic.completion_tokens_total == 5 and backend.traffic.in_flight == 0


async def test_a_request_waiting_in_the_queue_is_translated_for_the_backend_it_gets() -> None:
    async with run_fake_llama(FakeLlamaConfig(slots=1, token_delay=0.05)) as fake:
        config = make_config([fake.url], **{"queue.timeout": 10})
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            await wait_for(lambda: next(iter(balancer.components.registry)).health.slots_total == 1)
            replies = await asyncio.gather(*(client.chat("smollm2", ASK, options={"num_predict": 3}) for _ in range(3)))
            assert [r.message.content for r in replies] == ["Hello from the"] * 3
            assert fake.stats["max_processing"] == 1


async def test_racing_translates_for_each_racer_and_a_refusal_releases_every_claim(tmp_path: Path) -> None:
    fast_config, slow_config = FakeLlamaConfig(reply="Fast answer here."), FakeLlamaConfig(token_delay=1.0)
    async with run_fake_llama(fast_config) as fast, run_fake_llama(slow_config) as slow:
        backends = [{"url": slow.url, "name": "slow"}, {"url": fast.url, "name": "fast"}]
        config = config_file(tmp_path, backends, routing={"models": {"smollm2": {"race": 2}}})
        async with run_balancer(config) as balancer, ollama.AsyncClient(host=balancer.url) as client:
            registry = balancer.components.registry
            await wait_for(lambda: all(b.health.slots_total for b in registry))
            parts = [p async for p in await client.chat("smollm2", ASK, stream=True)]
            assert "".join(p.message.content or "" for p in parts) == "Fast answer here." and parts[-1].done
            await wait_for(lambda: slow.stats["cancelled"] == 1 and slow.stats["processing"] == 0)
            with pytest.raises(ollama.ResponseError) as refused:
                await client.chat("smollm2", ASK, options={"tfs_z": 0.5})
            assert refused.value.status_code == 400
            await wait_for(lambda: [b.traffic.in_flight for b in registry] == [0, 0])
