"""The fake's benchmark aids: a timeline of busy slots and deferred requests, and batch slowdown config."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_llama

CHAT = "/v1/chat/completions"


async def test_timeline_records_busy_slots_and_deferred_requests() -> None:
    config = FakeLlamaConfig(slots=1, token_delay=0.02, batch_slowdown=0.5, record_timeline=True)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True, "stream": True}
    async with run_fake_llama(config) as fake, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:

        async def one() -> None:
            async with s.post(fake.url + CHAT, json=body) as response:
                await response.read()

        await asyncio.gather(one(), one())
        timeline = fake.stats["timeline"]
    states = [(busy, deferred) for _, busy, deferred in timeline]
    # first starts, second is deferred, first ends and hands its slot to the second, second ends
    assert states == [(1, 0), (1, 1), (1, 0), (0, 0)]
    times = [t for t, _, _ in timeline]
    assert times == sorted(times)


async def test_timeline_is_off_by_default() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with run_fake_llama(FakeLlamaConfig()) as fake, aiohttp.ClientSession() as s:
        async with s.post(fake.url + CHAT, json=body) as response:
            await response.read()
        assert fake.stats["timeline"] == []


def test_negative_batch_slowdown_is_refused() -> None:
    with pytest.raises(ValueError):
        FakeLlamaConfig(batch_slowdown=-1)
