"""A backend that is itself an llmbalancer is recognised by its /health and /llmhealth; its busy GPUs
send work to the idle ones first (llama-balancer's contract)."""

from __future__ import annotations

import aiohttp

from llmbalancer.observe.gpu import Nvml
from llmbalancer.testing.fake_llama import run_fake_llama
from tests.support import get_json, make_config, run_balancer, wait_for
from tests.test_gpu import StubNvml

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_a_balancer_backend_reporting_busy_gpus_gets_work_only_when_no_idle_one_can() -> None:
    async with run_fake_llama() as fake_a, run_fake_llama() as fake_b:
        fast_gpu = {"gpu.interval": 0.05, "gpu.window": 0.2}
        async with (
            run_balancer(make_config([fake_a.url], **fast_gpu)) as inner_a,
            run_balancer(make_config([fake_b.url], **fast_gpu)) as inner_b,
        ):
            inner_a.components.gpu.nvml = Nvml(StubNvml([95.0]))
            inner_b.components.gpu.nvml = Nvml(StubNvml([5.0]))
            outer_config = make_config(
                [f"{inner_a.url}=a", f"{inner_b.url}=b"], **{"policy.name": "round_robin"}
            )
            async with run_balancer(outer_config) as outer, aiohttp.ClientSession() as session:
                registry = outer.components.registry
                a, b = registry.get("a"), registry.get("b")
                assert a is not None and b is not None
                await wait_for(
                    lambda: a.health.gpu_busy is True and b.health.gpu_busy is False and a.routable, timeout=10
                )
                snapshot_a = await get_json(session, inner_a.url + "/llmhealth")
                assert snapshot_a["status"] == "busy"

                before_a, before_b = fake_a.stats["completed"], fake_b.stats["completed"]
                for _ in range(6):
                    async with session.post(outer.url + "/v1/chat/completions", json=CHAT) as reply:
                        assert reply.status == 200
                assert fake_a.stats["completed"] == before_a
                assert fake_b.stats["completed"] == before_b + 6

                # Both busy: busy GPUs still serve rather than failing the request.
                inner_b.components.gpu.nvml = Nvml(StubNvml([99.0]))
                await wait_for(lambda: b.health.gpu_busy is True, timeout=10)
                for _ in range(4):
                    async with session.post(outer.url + "/v1/chat/completions", json=CHAT) as reply:
                        assert reply.status == 200
                assert fake_a.stats["completed"] > before_a
