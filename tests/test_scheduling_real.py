"""Scheduling against two real llama-servers (-np 2): slots never exceeded; prefix routing reuses the cache."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp

from llmbalancer.relay.access import Access
from tests.support import LlamaServer, make_config, run_balancer, wait_for

CHAT = "/v1/chat/completions"
SYSTEM = "You are a patient assistant who explains geography to children. " * 12


async def _server_load(session: aiohttp.ClientSession, server: LlamaServer) -> tuple[int, int]:
    """(busy slots from /slots, deferred requests from /metrics) as the server itself reports them."""
    async with session.get(server.url + "/slots") as reply:
        slots = await reply.json()
    async with session.get(server.url + "/metrics") as reply:
        metrics = await reply.text()
    deferred = re.search(r"^llamacpp:requests_deferred\s+([0-9.]+)", metrics, re.MULTILINE)
    return sum(1 for s in slots if s["is_processing"]), int(float(deferred.group(1))) if deferred else 0


async def test_slot_aware_never_sends_a_server_more_requests_than_its_slots(llama_fleet: list[LlamaServer]) -> None:
    config = make_config([s.url for s in llama_fleet], **{"policy.name": "slot_aware"})
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        registry = balancer.components.registry
        await wait_for(lambda: all(b.health.slots_total == 2 for b in registry), timeout=10)
        busiest, deferred_seen, queued_seen = 0, 0, 0

        async def one(index: int) -> None:
            body = {"messages": [{"role": "user", "content": f"Count to {index + 20}."}], "max_tokens": 24}
            async with session.post(balancer.url + CHAT, json=body) as reply:
                assert reply.status == 200, await reply.text()

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        try:
            for _ in range(400):  # bounded: at most ~20 s of sampling
                if all(t.done() for t in tasks):
                    break
                for server in llama_fleet:
                    busy, deferred = await _server_load(session, server)
                    busiest, deferred_seen = max(busiest, busy), max(deferred_seen, deferred)
                queued_seen = max(queued_seen, balancer.components.dispatcher.queue_depth)
                assert all(b.traffic.in_flight <= 2 for b in registry)
                await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert busiest <= 2 and deferred_seen == 0  # the servers never queued: the balancer did
        assert queued_seen > 0


def _turn(history: list[dict[str, str]], question: str, system: str = SYSTEM) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": system}, *history, {"role": "user", "content": question}],
        "max_tokens": 12,
    }


async def test_prefix_sends_a_follow_up_turn_to_the_server_holding_its_history(llama_fleet: list[LlamaServer]) -> None:
    config = make_config([s.url for s in llama_fleet], **{"policy.name": "prefix"})
    questions = ["What is the capital of France?", "Which river flows through Cairo?", "Where is Mount Fuji?"]
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        accesses: list[Access] = []
        balancer.components.proxy.on_complete.append(accesses.append)
        histories = []
        systems = [f"Session {i} of a school project. {SYSTEM}" for i in range(len(questions))]
        for question, system in zip(questions, systems, strict=True):  # first turns: no shared prefix, spread
            async with session.post(balancer.url + CHAT, json=_turn([], question, system)) as reply:
                answer = await reply.json()
            histories.append([
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
            ])
        assert len({a.backend for a in accesses}) == 2
        for index, history in enumerate(histories):
            follow_up_body = {**_turn(history, "Tell me more.", systems[index]), "stream": True}
            async with session.post(balancer.url + CHAT, json=follow_up_body) as reply:
                assert reply.status == 200
                stream = await reply.text()
            first, follow_up = accesses[index], accesses[-1]
            assert follow_up.backend == first.backend
            # The server reused the whole first turn (the other one has never seen this conversation).
            cache_n = int(re.findall(r'"cache_n":(\d+)', stream)[-1])
            assert first.prompt_tokens and cache_n >= first.prompt_tokens - 1
            assert follow_up.cached_tokens == cache_n  # read from the stream's finish chunk
