"""A key's minutes are counted through ``Counters``, so balancers that share one count a key's requests once:
two balancers on one shared ``Counters`` enforce one rpm between them.

First with one in-memory ``LocalCounters`` handed to both balancers, then as deployed: two replicas on one
real redis-server (``state.url``), whose counters ``app.py`` hands the keys' limits.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from llmbalancer.counters import LocalCounters
from llmbalancer.testing.fake_llama import run_fake_llama
from tests.keys_support import CHAT, TEAM_A, client, keyed_config
from tests.redis_support import running_redis, two_replicas
from tests.support import run_balancer


async def test_two_balancers_sharing_their_counters_enforce_one_rpm() -> None:
    left = 60 - time.time() % 60
    if left < 10:  # all requests in one minute
        await asyncio.sleep(left + 0.1)
    shared = LocalCounters()
    async with run_fake_llama() as fake:
        config = keyed_config([fake.url], {"name": "team-a", "key": TEAM_A, "rpm": 4})
        async with run_balancer(config) as one, run_balancer(config) as two:
            for balancer in (one, two):
                balancer.components.counters = shared
                balancer.components.proxy.keys.limits.use(shared)
            async with client(one.url, TEAM_A) as first, client(two.url, TEAM_A) as second:
                answered = 0
                for sdk in (first, second, first, second):
                    answered += len((await sdk.chat.completions.create(**CHAT)).choices)
                assert answered == 4
                for sdk in (first, second):
                    with pytest.raises(openai.RateLimitError) as caught:
                        await sdk.chat.completions.create(**CHAT)
                    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert fake.stats["requests"]["/v1/chat/completions"] == 4


async def test_two_replicas_on_one_redis_enforce_one_rpm(tmp_path: Path) -> None:
    left = 60 - time.time() % 60
    if left < 10:  # all requests in one minute window
        await asyncio.sleep(left + 0.1)
    with running_redis(tmp_path) as redis:
        async with run_fake_llama() as fake:
            keys = {"auth.keys": [{"name": "team-a", "key": TEAM_A, "rpm": 4}]}
            async with (
                two_replicas(redis, [fake.url], **keys, **{"state.timeout": 2.0}) as (one, two),
                client(one.url, TEAM_A) as first,
                client(two.url, TEAM_A) as second,
            ):
                answered = 0
                for sdk in (first, second, first, second):
                    answered += len((await sdk.chat.completions.create(**CHAT)).choices)
                assert answered == 4
                for sdk in (first, second):
                    with pytest.raises(openai.RateLimitError) as caught:
                        await sdk.chat.completions.create(**CHAT)
                    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert fake.stats["requests"]["/v1/chat/completions"] == 4
