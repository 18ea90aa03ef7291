"""Batch lines take idle slots only: never a backend's last free one, never while an interactive request
waits; batches run by metadata.priority; a line's failures are judged as the proxy judges them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmbalancer.batches import BatchRunner
from llmbalancer.fleet.capacity import capacity
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.batch_support import chat_line, client_for, jsonl, output_lines, wait_completed, wait_status
from tests.support import make_config, run_balancer, wait_for

SLOW = FakeLlamaConfig(slots=4, token_delay=0.01)


async def _start(client: Any, lines: list[dict[str, Any]], metadata: dict[str, str] | None = None) -> str:
    uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    created = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
    )
    return str(created.id)


async def test_batch_lines_never_take_a_backends_last_free_slot(tmp_path: Path) -> None:
    async with (
        run_fake_fleet(2, SLOW) as fakes,
        run_balancer(make_config([f"{f.url}=f{i}" for i, f in enumerate(fakes)],
                                 **{"batch.dir": str(tmp_path)})) as balancer,
        client_for(balancer.url) as client,
    ):
        registry = balancer.components.registry
        await wait_for(lambda: all(capacity(b) == 4 for b in registry), timeout=10)
        batch_id = await _start(client, [chat_line(f"l{i}", max_tokens=10) for i in range(40)])
        most_held: dict[str, int] = {}
        fewest_free = 4
        deadline = time.monotonic() + 30
        while (await client.batches.retrieve(batch_id)).status != "completed" and time.monotonic() < deadline:
            for backend in registry:
                most_held[backend.name] = max(most_held.get(backend.name, 0), backend.traffic.in_flight)
                fewest_free = min(fewest_free, 4 - backend.traffic.in_flight)
            await asyncio.sleep(0.005)
        batch = await client.batches.retrieve(batch_id)
    assert batch.status == "completed"
    assert most_held == {"f0": 3, "f1": 3}  # all but one slot of each, and used
    assert fewest_free == 1


async def test_no_batch_line_starts_while_an_interactive_request_waits(tmp_path: Path) -> None:
    config = FakeLlamaConfig(slots=3, token_delay=0.02)
    async with (
        run_fake_fleet(1, config) as fakes,
        run_balancer(make_config([fakes[0].url], **{"batch.dir": str(tmp_path)})) as balancer,
        client_for(balancer.url) as client,
        aiohttp.ClientSession() as session,
    ):
        runner = balancer.components.batches
        dispatcher = balancer.components.dispatcher
        assert runner is not None
        await wait_for(lambda: capacity(next(iter(balancer.components.registry))) == 3, timeout=10)
        queued_at_start: list[int] = []
        start_line = runner._start_line

        def recording(*args: Any) -> None:
            queued_at_start.append(dispatcher.queue_depth)
            start_line(*args)

        runner._start_line = recording  # type: ignore[method-assign]
        batch_id = await _start(client, [chat_line(f"l{i}", max_tokens=15, ignore_eos=True) for i in range(30)])
        await wait_completed(client, batch_id, 2)

        async def interactive() -> float:
            started = time.monotonic()
            body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                    "ignore_eos": True}
            async with session.post(balancer.url + "/v1/chat/completions", json=body) as reply:
                assert reply.status == 200
                await reply.read()
            return time.monotonic() - started

        # Three users at once: one takes the slot batch work left free, the others wait for batch lines to end.
        durations = await asyncio.gather(interactive(), interactive(), interactive())
        waited = balancer.components.metrics.queue_wait
        batch = await wait_status(client, batch_id, timeout=30)
    assert batch.status == "completed"
    assert sum(waited.counts[1:]) >= 1  # someone did wait in the admission queue
    assert queued_at_start and all(depth == 0 for depth in queued_at_start)
    # Those that waited, waited for one line (15 tokens) at most, then ran their own 20.
    assert max(durations) < 15 * 0.02 + 20 * 0.02 + 1.0


async def test_a_higher_priority_batch_runs_before_an_older_one(tmp_path: Path) -> None:
    async with (
        run_fake_fleet(1, FakeLlamaConfig(slots=2, token_delay=0.01)) as fakes,
        run_balancer(make_config([fakes[0].url], **{"batch.dir": str(tmp_path)})) as balancer,
        client_for(balancer.url) as client,
    ):
        await wait_for(lambda: all(capacity(b) == 2 for b in balancer.components.registry), timeout=10)
        older = await _start(client, [chat_line(f"old{i}", max_tokens=8) for i in range(12)])
        urgent = await _start(client, [chat_line(f"new{i}", max_tokens=8) for i in range(4)], {"priority": "5"})
        done = await wait_status(client, urgent, timeout=30)
        older_then = await client.batches.retrieve(older)
        await wait_status(client, older, timeout=30)
    assert done.status == "completed"
    assert older_then.request_counts is not None and older_then.request_counts.completed <= 3


async def test_a_5xx_line_is_retried_elsewhere_a_4xx_and_an_unknown_model_go_to_the_error_file(
    tmp_path: Path,
) -> None:
    async with (
        run_fake_fleet(2) as fakes,
        run_balancer(make_config([f"{f.url}=f{i}" for i, f in enumerate(fakes)],
                                 **{"batch.dir": str(tmp_path), "routing.strict_models": True})) as balancer,
        client_for(balancer.url) as client,
    ):
        runner = balancer.components.batches
        assert isinstance(runner, BatchRunner)
        await wait_for(lambda: all(b.health.served_models for b in balancer.components.registry), timeout=10)
        fakes[0].set_fault("error_500", count=1)  # one line fails on f0 with a 500: sent again, to f1
        fakes[1].set_fault("error_500", count=1, status=400)  # one line answered 400: that is its answer
        lines = [chat_line(f"ok{i}") for i in range(6)] + [chat_line("lost", model="nope")]
        batch = await wait_status(client, await _start(client, lines), timeout=30)
        errors = await output_lines(client, batch.error_file_id)
        results = await output_lines(client, batch.output_file_id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 2)
    assert runner.outcomes["retried"] == 1
    by_id = {e["custom_id"]: e for e in errors}
    assert by_id["lost"]["response"]["status_code"] == 404
    assert by_id["lost"]["response"]["body"]["error"]["code"] == "model_not_found"
    [bad_request] = [e for e in errors if e["custom_id"] != "lost"]
    assert bad_request["response"]["status_code"] == 400
    assert len(results) == 5 and all(r["response"]["status_code"] == 200 for r in results)
