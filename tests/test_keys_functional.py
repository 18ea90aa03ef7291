"""Client keys through the official OpenAI SDK, on both legs (the lean relay's chat completions, aiohttp's
model list and native routes): who gets in, which models they see, what reaches the backend and the logs."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from structlog.testing import capture_logs

from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_llama
from tests.keys_support import CHAT, NO_KEY, TEAM_A, TEAM_B, WRONG, client, keyed_config
from tests.support import run_balancer

BACKEND_KEY = "backend-own-secret-42"


@pytest.mark.parametrize("relay", ["lean", "aiohttp"])
async def test_a_missing_or_wrong_key_is_an_authentication_error(relay: str) -> None:
    async with run_fake_llama() as fake:
        config = keyed_config([fake.url], {"name": "team-a", "key": TEAM_A}, **{"server.relay": relay})
        async with run_balancer(config) as balancer, client(balancer.url, WRONG) as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                await wrong.chat.completions.create(**CHAT)
            assert caught.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            async with client(balancer.url, TEAM_A) as right:
                with pytest.raises(openai.AuthenticationError) as caught:
                    await right.chat.completions.create(**CHAT, extra_headers=NO_KEY)
                assert "didn't provide an API key" in caught.value.message
                reply = await right.chat.completions.create(**CHAT)
                assert reply.choices[0].message.content
        assert fake.stats["requests"].get("/v1/chat/completions") == 1  # refused requests never reached it


async def test_x_api_key_is_accepted_as_the_key() -> None:
    async with run_fake_llama() as fake:
        config = keyed_config([fake.url], {"name": "team-a", "key": TEAM_A})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT,
                                    headers={"x-api-key": TEAM_A}) as reply:
                assert reply.status == 200
            seen = fake.stats["last_by_path"]["/v1/chat/completions"]["headers"]
            assert "x-api-key" not in seen and "authorization" not in seen


async def test_a_model_outside_the_keys_list_is_not_found_and_models_list_shows_only_its_models() -> None:
    async with run_fake_llama() as fake:
        backend = {"url": fake.url, "name": "gpu", "models": ["smollm2", "qwen-7b"]}
        config = keyed_config(
            [backend], {"name": "smol-only", "key": TEAM_A, "models": ["smol.*"]}, {"name": "all", "key": TEAM_B},
        )
        async with run_balancer(config) as balancer:
            async with client(balancer.url, TEAM_A) as smol:
                with pytest.raises(openai.NotFoundError) as caught:
                    await smol.chat.completions.create(**{**CHAT, "model": "qwen-7b"})
                assert caught.value.code == "model_not_found"
                assert "qwen-7b" in caught.value.message
                assert (await smol.chat.completions.create(**CHAT)).choices
                assert [m.id async for m in smol.models.list()] == ["smollm2"]
            async with client(balancer.url, TEAM_B) as everyone:
                assert sorted([m.id async for m in everyone.models.list()]) == ["qwen-7b", "smollm2"]
            async with aiohttp.ClientSession() as session:
                async with session.get(balancer.url + "/api/tags", headers={"Authorization": f"Bearer {TEAM_A}"}) as r:
                    assert [m["name"] for m in (await r.json())["models"]] == ["smollm2"]
                async with session.get(balancer.url + "/api/tags") as reply:
                    assert reply.status == 401


async def test_the_key_never_reaches_the_backend_and_never_appears_in_logs() -> None:
    async with run_fake_llama() as plain, run_fake_llama() as guarded:
        config = keyed_config(
            [f"{plain.url}=plain", {"url": guarded.url, "name": "guarded", "api_key": BACKEND_KEY}],
            {"name": "team-a", "key": TEAM_A}, **{"policy.name": "round_robin"},
        )
        with capture_logs() as logs:
            async with run_balancer(config) as balancer, client(balancer.url, TEAM_A) as sdk:
                for _ in range(4):
                    stream = await sdk.chat.completions.create(**CHAT, stream=True)
                    assert [c async for c in stream]
                await sdk.chat.completions.create(**CHAT)
                async with (  # aiohttp's leg: a native route, any method
                    aiohttp.ClientSession() as session,
                    session.get(balancer.url + "/slots", headers={"x-api-key": TEAM_A}) as reply,
                ):
                    assert reply.status == 200
        for fake in (plain, guarded):
            assert fake.stats["requests"]["/v1/chat/completions"] >= 2
        seen = plain.stats["last_by_path"]["/v1/chat/completions"]["headers"]
        assert "authorization" not in seen and "x-api-key" not in seen
        own = guarded.stats["last_by_path"]["/v1/chat/completions"]["headers"]["authorization"]
        assert own == f"Bearer {BACKEND_KEY}"
        slots = (plain if "/slots" in plain.stats["last_by_path"] else guarded).stats["last_by_path"]["/slots"]
        assert TEAM_A not in json.dumps(slots["headers"])
        events = [e for e in logs if e.get("event") == "request"]
        assert len(events) >= 6 and {e["key"] for e in events} == {"team-a"}
        for text in (TEAM_A, BACKEND_KEY):
            assert text not in json.dumps(logs, default=str)


async def test_answers_of_a_keyed_request_carry_its_rate_limit_headers_and_rpm_is_enforced() -> None:
    async with run_fake_llama() as fake:
        config = keyed_config([fake.url], {"name": "team-a", "key": TEAM_A, "rpm": 2, "tpm": 1000})
        async with run_balancer(config) as balancer, client(balancer.url, TEAM_A) as sdk:
            raw = await sdk.chat.completions.with_raw_response.create(**CHAT)
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
            assert raw.headers["x-ratelimit-remaining-requests"] == "1"
            assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) <= 1000 - CHAT["max_tokens"]
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
            stream = await sdk.chat.completions.with_raw_response.create(**CHAT, stream=True)
            assert stream.headers["x-ratelimit-remaining-requests"] == "0"
            assert [c async for c in stream.parse()]  # type: ignore[attr-defined]
            with pytest.raises(openai.RateLimitError) as caught:
                await sdk.chat.completions.create(**CHAT)
            error = caught.value
            assert error.code == "rate_limit_exceeded"
            assert 1 <= int(error.response.headers["retry-after"]) <= 60
            assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
            assert "x-ratelimit-reset-tokens" in error.response.headers
        assert fake.stats["requests"]["/v1/chat/completions"] == 2


async def test_over_max_concurrency_is_a_rate_limit_error_and_the_place_comes_back_when_a_request_ends() -> None:
    async with run_fake_llama(FakeLlamaConfig(token_delay=0.05, slots=4)) as fake:
        config = keyed_config([fake.url], {"name": "team-a", "key": TEAM_A, "max_concurrency": 1})
        async with run_balancer(config) as balancer, client(balancer.url, TEAM_A) as sdk:
            stream = await sdk.chat.completions.create(**{**CHAT, "max_tokens": 20}, stream=True)
            with pytest.raises(openai.RateLimitError) as caught:
                await sdk.chat.completions.create(**CHAT)
            assert "in flight" in caught.value.message
            assert caught.value.response.headers["retry-after"] == "1"
            assert [c async for c in stream]
            limits = balancer.components.proxy.keys.limits
            await asyncio.sleep(0.05)
            assert limits.in_flight("team-a") == 0
            assert (await sdk.chat.completions.create(**CHAT)).choices
            # A request its client abandons gives its place back too.
            stream = await sdk.chat.completions.create(**{**CHAT, "max_tokens": 20}, stream=True)
            await stream.close()
            for _ in range(100):
                if limits.in_flight("team-a") == 0:
                    break
                await asyncio.sleep(0.02)
            assert limits.in_flight("team-a") == 0
            assert (await sdk.chat.completions.create(**CHAT)).choices
        assert fake.stats["requests"]["/v1/chat/completions"] == 4


async def test_a_disabled_key_is_refused_like_an_unknown_one() -> None:
    async with run_fake_llama() as fake:
        config = keyed_config(
            [fake.url], {"name": "team-a", "key": TEAM_A, "enabled": False}, {"name": "team-b", "key": TEAM_B}
        )
        async with run_balancer(config) as balancer, client(balancer.url, TEAM_A) as sdk:
            with pytest.raises(openai.AuthenticationError):
                await sdk.chat.completions.create(**CHAT)
