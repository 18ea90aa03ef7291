"""Passive health: the circuit breaker ejects a backend whose requests keep failing, then one probe decides."""

from __future__ import annotations

import asyncio

import aiohttp

from llmbalancer.config import CircuitConfig
from llmbalancer.fleet.backend import Backend, BackendState, CircuitState
from llmbalancer.fleet.circuit import Circuit
from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.support import make_config, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _failing(circuit: Circuit, backend: Backend) -> None:
    backend.traffic.consecutive_failures += 1
    circuit.failure(backend, backend.traffic.consecutive_failures)


def test_consecutive_failures_open_the_circuit_for_a_cooldown_that_grows() -> None:
    now = [0.0]
    circuit = Circuit(CircuitConfig(failures=2, cooldown=1.0, cooldown_max=3.0), clock=lambda: now[0])
    backend = Backend("a", "http://a", state=BackendState.HEALTHY)
    _failing(circuit, backend)
    assert backend.breaker.state is CircuitState.CLOSED and circuit.allows(backend)
    _failing(circuit, backend)
    assert backend.breaker.state is CircuitState.OPEN and not circuit.allows(backend)
    now[0] = 1.0
    assert circuit.allows(backend)  # half-open: one probe may go
    circuit.claimed(backend)
    assert backend.breaker.state is CircuitState.HALF_OPEN and not circuit.allows(backend)
    _failing(circuit, backend)  # the probe failed: open again, for twice as long
    now[0] = 2.5
    assert not circuit.allows(backend)
    now[0] = 3.0
    assert circuit.allows(backend)
    circuit.claimed(backend)
    backend.traffic.consecutive_failures = 0
    circuit.success(backend)
    assert backend.breaker.state is CircuitState.CLOSED and backend.breaker.opens == 2
    assert 0 < backend.breaker.health_score < 1


def test_the_score_rewards_success_and_the_fastest_first_byte() -> None:
    circuit = Circuit()
    fast, slow = Backend("fast", "http://f"), Backend("slow", "http://s")
    for backend, ttfb in ((fast, 0.1), (slow, 0.3)):
        backend.traffic.ttfb_avg, backend.breaker.health_score = ttfb, 0.5
    circuit.success(fast, [fast, slow])
    circuit.success(slow, [fast, slow])
    assert fast.breaker.health_score > slow.breaker.health_score > 0.5


async def test_a_backend_failing_requests_is_ejected_then_a_probe_brings_it_back() -> None:
    async with run_fake_fleet(2) as (good, bad):
        config = make_config(
            [f"{good.url}=good", f"{bad.url}=bad"],
            **{"policy.name": "round_robin", "circuit.failures": 2, "circuit.cooldown": 0.5},
        )
        bad.set_fault("error_500")
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            backend = balancer.components.registry.get("bad")
            assert backend is not None

            async def send(count: int) -> None:
                for _ in range(count):
                    async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                        assert reply.status == 200  # retried on the good one

            await send(6)
            assert backend.breaker.state is CircuitState.OPEN
            reached = bad.stats["requests"]["/v1/chat/completions"]
            await send(4)
            assert bad.stats["requests"]["/v1/chat/completions"] == reached  # ejected: none sent while open
            bad.clear_fault()
            await asyncio.sleep(0.6)
            await send(4)
            await wait_for(lambda: backend.breaker.state is CircuitState.CLOSED, timeout=5)
            assert bad.stats["requests"]["/v1/chat/completions"] > reached
