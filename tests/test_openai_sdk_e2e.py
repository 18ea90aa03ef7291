"""The official openai SDK, pointed at llmbalancer, gets real answers from two real llama-servers."""

from __future__ import annotations

import asyncio
import time

import openai

from tests.support import LlamaServer, make_config, run_balancer

MESSAGES = [{"role": "user", "content": "Say hello."}]


def _client_kwargs(url: str) -> dict[str, object]:
    return {"base_url": url + "/v1", "api_key": "unused", "max_retries": 0, "timeout": 30.0}


async def test_sync_and_async_sdk_clients_stream_and_not_through_both_backends(
    llama_fleet: list[LlamaServer],
) -> None:
    async with run_balancer(make_config([s.url for s in llama_fleet], **{"policy.name": "round_robin"})) as balancer:

        def sync_calls() -> tuple[str, str]:
            with openai.OpenAI(**_client_kwargs(balancer.url)) as client:  # type: ignore[arg-type]
                reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8)
                stream = client.chat.completions.create(
                    model="smollm2", messages=MESSAGES, max_tokens=8, stream=True
                )
                pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            return reply.choices[0].message.content or "", "".join(pieces)

        # The sync client blocks, so it runs in a thread while this loop serves the balancer.
        sync_text, sync_streamed = await asyncio.to_thread(sync_calls)
        assert sync_text and sync_streamed

        async with openai.AsyncOpenAI(**_client_kwargs(balancer.url)) as aclient:  # type: ignore[arg-type]
            reply = await aclient.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8)
            assert reply.choices[0].message.content
            assert reply.model == "smollm2"
            stream = await aclient.chat.completions.create(
                model="smollm2", messages=MESSAGES, max_tokens=8, stream=True
            )
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            assert "".join(pieces)

        served = {b.name: b.traffic.requests_total for b in balancer.components.registry}
        assert len(served) == 2 and all(count >= 1 for count in served.values()), served


async def test_tokens_arrive_incrementally_first_chunk_long_before_the_last(
    llama_fleet: list[LlamaServer],
) -> None:
    async with (
        run_balancer(make_config([llama_fleet[0].url])) as balancer,
        openai.AsyncOpenAI(**_client_kwargs(balancer.url)) as client,  # type: ignore[arg-type]
    ):
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Count from one to fifty in words."}],
            max_tokens=48,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        arrivals: list[float] = []
        generation_ms = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
            timings = (chunk.model_extra or {}).get("timings")
            if timings:
                generation_ms = timings["predicted_ms"]
    assert len(arrivals) >= 40 and generation_ms
    # Relayed as generated, not collected: the client saw the chunks spread over most of the time the
    # backend itself says it spent generating them (a buffering proxy would deliver them all at once).
    assert arrivals[-1] - arrivals[0] > 0.5 * generation_ms / 1000
