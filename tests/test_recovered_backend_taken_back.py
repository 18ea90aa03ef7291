"""A backend back after an outage takes traffic within a second of its first good probe, circuit included:
the failures that opened its circuit were the outage, not a reason to wait out a cooldown."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from llmbalancer.fleet.backend import BackendState, CircuitState
from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.support import make_config, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_a_backend_ready_again_is_taken_back_at_once_though_its_circuit_had_opened() -> None:
    async with run_fake_fleet(2) as (victim, other):
        config = make_config(
            [f"{victim.url}=victim", f"{other.url}=other"],
            **{"policy.name": "round_robin", "circuit.failures": 1, "circuit.cooldown": 30, "health.interval": 5},
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            registry = balancer.components.registry
            backend = registry.get("victim")
            assert backend is not None
            await wait_for(lambda: all(b.routable for b in registry), timeout=10)
            served: list[tuple[float, str | None]] = []
            balancer.components.proxy.on_complete.append(
                lambda access: served.append((time.monotonic(), access.backend)) if access.status == 200 else None
            )
            stop = asyncio.Event()

            async def steady() -> None:
                while not stop.is_set():
                    async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                        assert reply.status == 200, await reply.text()
                    await asyncio.sleep(0.02)

            traffic = asyncio.create_task(steady())
            try:
                await victim.stop()  # as a kill: nothing listens
                # The next request sent there is refused (the poller, every 5 s, has not looked yet): the
                # backend leaves rotation and its circuit opens for 30 s (circuit.failures 1).
                await wait_for(lambda: backend.breaker.state is CircuitState.OPEN, timeout=5)
                assert backend.state is BackendState.UNHEALTHY
                await victim.start()
                await wait_for(lambda: backend.routable, timeout=5)
                ready_at = time.monotonic()
                await wait_for(lambda: any(t > ready_at and name == "victim" for t, name in served), timeout=5)
                first = min(t for t, name in served if t > ready_at and name == "victim")
                assert first - ready_at < 1.0
            finally:
                stop.set()
                await traffic
