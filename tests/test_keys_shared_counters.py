"""A key's minutes are counted through ``Counters``, so balancers that share one count a key's requests once:
two balancers on one shared ``Counters`` enforce one rpm between them.

This branch has no ``state.url``: the shared counters here are one in-memory ``LocalCounters`` handed to both
balancers (what ``app.py`` does with the replicas' Redis-backed ones). The same test with two replicas on
one Redis (``state.url``) belongs with the replicas merge.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from llmbalancer.counters import LocalCounters
from llmbalancer.testing.fake_llama import run_fake_llama
from tests.keys_support import CHAT, TEAM_A, client, keyed_config
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
