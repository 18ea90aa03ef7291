"""Keys and upstream credentials against real llama-servers: tpm counted from the usage the server reports,
and a server started with `--api-key` probed and served with the backend's `api_key`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.keys_support import TEAM_A, client, keyed_config
from tests.support import LlamaServer, make_config, run_balancer, start_llama_server, wait_for, wait_ready

MESSAGES = [{"role": "user", "content": "Say hello to the whole wide world in one short sentence."}]
SERVER_KEY = "llama-server-secret-key"


async def test_tpm_is_counted_from_the_usage_the_server_reports(llama_fleet: list[LlamaServer]) -> None:
    left = 60 - time.time() % 60
    if left < 20:  # all three requests in one minute
        await asyncio.sleep(left + 0.1)
    config = keyed_config([llama_fleet[0].url], {"name": "team-a", "key": TEAM_A, "tpm": 100})
    async with run_balancer(config) as balancer, client(balancer.url, TEAM_A) as sdk:
        first = await sdk.chat.completions.with_raw_response.create(model="smollm2", messages=MESSAGES, max_tokens=8)
        usage = first.parse().usage
        assert usage is not None and usage.prompt_tokens > 20  # the prompt counts, not only max_tokens
        spent = usage.prompt_tokens + usage.completion_tokens
        # Admitted on the estimate (max_tokens), corrected to what the server reported once it ended.
        assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - 8)
        stream = await sdk.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8, stream=True)
        assert [c async for c in stream]
        used = await balancer.components.proxy.keys.limits.counters.get("key:team-a:tokens")
        assert used >= 2 * spent - 2  # both answers' prompt + completion (the stream's from its timings)
        assert used >= 100 - 8
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8)
        headers = caught.value.response.headers
        assert headers["x-ratelimit-limit-tokens"] == "100"
        assert headers["x-ratelimit-remaining-tokens"] == str(max(0, 100 - used))
        assert 1 <= int(headers["retry-after"]) <= 60
        assert "tokens per min" in caught.value.message


async def test_a_backend_behind_llama_servers_api_key_is_probed_and_served_with_its_api_key(tmp_path: Path) -> None:
    server = start_llama_server(tmp_path, extra=["--api-key", SERVER_KEY])
    try:
        await asyncio.to_thread(wait_ready, server.url)
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/slots") as reply:
                assert reply.status == 401  # the server wants its key
            backend = {"url": server.url, "name": "locked", "api_key": SERVER_KEY}
            async with run_balancer(make_config([backend])) as balancer:
                locked = balancer.components.registry.get("locked")
                assert locked is not None
                await wait_for(lambda: locked.health.slots_total == 2)  # /slots answered: probed with the key
                async with openai.AsyncOpenAI(
                    base_url=balancer.url + "/v1", api_key="clients-own-key", max_retries=0
                ) as sdk:
                    reply = await sdk.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4)
                    assert reply.choices[0].message.content
                    stream = await sdk.chat.completions.create(
                        model="smollm2", messages=MESSAGES, max_tokens=4, stream=True
                    )
                    assert [c async for c in stream]
                async with session.get(balancer.url + "/v1/models") as reply:
                    assert [m["id"] for m in (await reply.json())["data"]] == ["smollm2"]
                async with session.get(balancer.url + "/slots") as reply:  # aiohttp's leg: a native route
                    assert reply.status == 200
            async with run_balancer(make_config([f"{server.url}=bare"])) as balancer:
                bare = balancer.components.registry.get("bare")
                assert bare is not None
                await asyncio.sleep(0.5)
                assert bare.health.slots_total is None  # without the key, /slots is refused
                async with session.post(balancer.url + "/v1/chat/completions", json={
                    "model": "smollm2", "messages": MESSAGES, "max_tokens": 4,
                }) as reply:
                    assert reply.status == 401  # the server's own refusal, passed through
    finally:
        server.stop()
