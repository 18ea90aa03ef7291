"""Binding from the slot's side on real sockets, against the project's fake llama-server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.support import make_config, run_balancer, wait_for

CHAT = "/v1/chat/completions"


def conversation(system: str, turns: int, max_tokens: int = 4) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn}: " + "tell me more about it " * 10})
        messages.append({"role": "assistant", "content": f"answer {turn}: " + "here is more about it " * 10})
    messages.append({"role": "user", "content": "and then?"})
    return {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}


SHOP = "You are the support assistant of a large shop. " * 12
TUTOR = "You are a patient tutor who explains things slowly. " * 12
POET = "You write short poems about the sea, in English only. " * 12
FRENCH = "You translate English to French, word for word, nothing else. " * 12


async def test_a_freed_slot_goes_to_the_queued_request_whose_history_that_server_holds() -> None:
    # Two 1-slot servers, each holding one chat's history; both busy; three requests queue: a new chat first,
    # then the two follow-ups. The server that frees first serves the follow-up whose history it holds, the last
    # in line. (prefix_max_wait 0: nobody holds out for its own server, so the binding is decided by the pass.)
    config = FakeLlamaConfig(slots=1, token_delay=0.02, prefill_per_token=0.002)
    settings = {"policy.name": "prefix", "policy.prefix_max_wait": 0.0, "queue.max_pass_over": 30.0}
    async with (
        run_fake_fleet(2, config) as fakes,
        run_balancer(make_config([f.url for f in fakes], **settings)) as balancer,
        aiohttp.ClientSession() as session,
    ):
        registry, dispatcher = balancer.components.registry, balancer.components.dispatcher
        await wait_for(lambda: all(b.health.slots_total == 1 for b in registry), timeout=5)

        def served() -> list[int]:
            return [f.stats["requests"].get(CHAT, 0) for f in fakes]

        async def post(body: dict[str, Any]) -> tuple[dict[str, Any], float]:
            async with session.post(balancer.url + CHAT, json=body) as reply:
                assert reply.status == 200
                return await reply.json(), time.monotonic()

        homes = {}
        for system in (SHOP, TUTOR):
            before = served()
            await post(conversation(system, 1))
            homes[system] = next(i for i, (a, b) in enumerate(zip(before, served(), strict=True)) if b > a)
        assert sorted(homes.values()) == [0, 1]  # one history on each server
        # Both servers busy: a short request on one, a long one on the other.
        short = asyncio.create_task(post(conversation(POET, 0, max_tokens=15)))
        await wait_for(lambda: sum(b.traffic.in_flight for b in registry) == 1)
        frees_first = next(i for i, f in enumerate(fakes) if f.stats["processing"])
        long = asyncio.create_task(post(conversation(POET, 0, max_tokens=80)))
        await wait_for(lambda: sum(b.traffic.in_flight for b in registry) == 2)
        first = next(system for system, home in homes.items() if home == frees_first)
        second = next(system for system, home in homes.items() if home != frees_first)
        order = [conversation(FRENCH, 1), conversation(second, 2), conversation(first, 2)]
        queued = []
        for depth, body in enumerate(order, start=1):
            queued.append(asyncio.create_task(post(body)))
            await wait_for(lambda depth=depth: dispatcher.queue_depth == depth, timeout=5)
        assert not short.done()  # the three queued before a slot freed
        (_, new_done), _, (first_reply, first_done) = await asyncio.wait_for(asyncio.gather(*queued), timeout=30)
        await asyncio.gather(short, long)
        assert first_reply["timings"]["cache_n"] > 200  # the freed slot went to the history it holds ...
        assert first_done < new_done  # ... ahead of the new chat at the queue's head


async def test_a_queued_request_starts_on_the_server_within_milliseconds_of_the_slot_freeing() -> None:
    # The health poll is 30 s apart: only the completion itself can have bound the queued request.
    config = FakeLlamaConfig(slots=1, token_delay=0.02, record_timeline=True)
    async with (
        run_fake_fleet(1, config) as (fake,),
        run_balancer(make_config([fake.url], **{"health.interval": 30.0})) as balancer,
        aiohttp.ClientSession() as session,
    ):
        dispatcher = balancer.components.dispatcher
        await wait_for(lambda: all(b.health.slots_total == 1 for b in balancer.components.registry), timeout=5)

        async def post(body: dict[str, Any]) -> int:
            async with session.post(balancer.url + CHAT, json=body) as reply:
                await reply.read()
                return reply.status

        first = asyncio.create_task(post(conversation(POET, 0, max_tokens=10)))
        await wait_for(lambda: fake.stats["processing"] == 1)
        queued = asyncio.create_task(post(conversation(FRENCH, 0, max_tokens=2)))
        await wait_for(lambda: dispatcher.queue_depth == 1)
        assert await asyncio.wait_for(asyncio.gather(first, queued), timeout=10) == [200, 200]
        timeline = fake.stats["timeline"]  # (time, busy, deferred) at every change
        freed = next(t for (t, busy, _), (_, before, _) in zip(timeline[1:], timeline, strict=False)
                     if busy == 0 and before == 1)
        started = next(t for t, busy, _ in timeline if t > freed and busy == 1)
        assert started - freed < 0.1  # a connect and a request's way through the proxy, not a poll
