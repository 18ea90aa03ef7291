"""Racing: a route with ``race: 2`` sends each request to two backends and streams the faster one;
the slower backend's request is cancelled at once and its slot frees."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from llmbalancer.testing.fake_ollama import FakeOllamaConfig, run_fake_ollama
from tests.model_fleet import config_file
from tests.support import run_balancer, wait_for

HELLO = [{"role": "user", "content": "Say hello."}]


async def test_race_2_streams_the_faster_backend_and_cancels_the_slower_which_frees_its_slot(tmp_path: Path) -> None:
    fast_config = FakeOllamaConfig(models=("smol",), reply="Fast answer here.")
    slow_config = FakeOllamaConfig(models=("smol",), reply="Slow answer here.", token_delay=1.0)
    async with run_fake_ollama(fast_config) as fast, run_fake_ollama(slow_config) as slow:
        config = config_file(
            tmp_path,
            [
                {"url": slow.url, "name": "slow", "models": ["smol"]},
                {"url": fast.url, "name": "fast", "models": ["smol"]},
            ],
            routing={"models": {"smol": {"race": 2}}},
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            registry = balancer.components.registry
            for backend in registry:
                backend.breaker.health_score = 0.5
            for round_ in range(2):  # round robin makes each backend the first-claimed once
                body = {"model": "smol", "messages": HELLO, "stream": True}
                async with session.post(balancer.url + "/api/chat", json=body) as reply:
                    assert reply.status == 200
                    lines = [json.loads(line) async for line in reply.content if line.strip()]
                assert "".join(line["message"]["content"] for line in lines) == "Fast answer here."
                # The slow backend was sent the request too, and saw it cancelled: its slot is free.
                await wait_for(lambda r=round_: slow.stats["cancelled"] == r + 1, timeout=2.0)
                assert slow.stats["processing"] == 0
            assert slow.served["smol"] == 2 and fast.served["smol"] == 2
            assert slow.stats["completed"] == 0 and fast.stats["completed"] == 2
            assert [b.traffic.in_flight for b in registry] == [0, 0]
            # The winner is credited (with the fastest-response bonus); the loser is not blamed.
            scores = {b.name: b.breaker.health_score for b in registry}
            assert scores["fast"] > 0.5 and scores["slow"] == 0.5


async def test_without_race_each_request_goes_to_one_backend_only(tmp_path: Path) -> None:
    async with run_fake_ollama(FakeOllamaConfig(models=("smol",))) as a, run_fake_ollama(
        FakeOllamaConfig(models=("smol",))
    ) as b:
        config = config_file(tmp_path, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}])
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            for _ in range(4):
                body = {"model": "smol", "messages": HELLO, "stream": False}
                async with session.post(balancer.url + "/api/chat", json=body) as reply:
                    assert reply.status == 200
        assert a.served["smol"] + b.served["smol"] == 4
