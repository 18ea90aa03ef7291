"""A burst of streams larger than the real fleet's slots: queued requests take freed slots at once, and
no attempt fails on a connection the server dropped (nothing is retried, nothing charged to a backend).

llama-server drops a kept-alive connection reused within milliseconds of the end of a streamed response
(`relay/proxy.py: drops_connections_reused_after_a_stream`); a balancer binding a queued request to a freed
slot reuses exactly that connection at once, so before the fix 5-13 of 20 such requests were retried."""

from __future__ import annotations

import asyncio

import aiohttp

from llmbalancer.relay.access import Access
from tests.support import LlamaServer, make_config, run_balancer, wait_for


async def test_twenty_streams_on_four_real_slots_need_no_retry_and_charge_no_error(
    llama_fleet: list[LlamaServer],
) -> None:
    config = make_config([s.url for s in llama_fleet])
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        registry = balancer.components.registry
        await wait_for(lambda: all(b.health.slots_total == 2 for b in registry), timeout=10)
        finished: list[Access] = []
        balancer.components.proxy.on_complete.append(finished.append)

        async def stream(index: int) -> None:
            body = {
                "model": "smollm2", "stream": True, "max_tokens": 24, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Tell me story number {index}."}],
            }
            async with session.post(balancer.url + "/v1/chat/completions", json=body) as reply:
                assert reply.status == 200
                data = await reply.read()
                assert b"event: error" not in data and b"[DONE]" in data

        for _ in range(2):  # twice in a row: the second burst reuses what the first left in the pool
            await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(20))), timeout=120)
        assert len(finished) == 40
        assert [a.attempt_errors for a in finished if a.attempts != 1] == []
        assert all(b.traffic.errors_total == 0 and b.traffic.last_error is None for b in registry)
