"""One sweep keeps many deadlines: late work times out, prompt work does not, a foreign cancel stays one."""

from __future__ import annotations

import asyncio

import pytest

from llmbalancer.relay.deadlines import Deadlines


async def test_work_past_its_deadline_raises_timeout_error() -> None:
    deadlines = Deadlines(resolution=0.01)
    with pytest.raises(TimeoutError), deadlines.within(0.05):
        await asyncio.sleep(5)


async def test_work_within_its_deadline_finishes_and_later_awaits_are_not_cancelled() -> None:
    deadlines = Deadlines(resolution=0.01)
    with deadlines.within(0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # past the deadline: nothing fires once the block is left
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_many_deadlines_fire_independently() -> None:
    deadlines = Deadlines(resolution=0.01)

    async def wait(seconds: float, deadline: float) -> str:
        try:
            with deadlines.within(deadline):
                await asyncio.sleep(seconds)
        except TimeoutError:
            return "timeout"
        return "done"

    results = await asyncio.wait_for(
        asyncio.gather(wait(0.0, 0.2), wait(5, 0.05), wait(0.01, 0.5), wait(5, 0.1)), timeout=5
    )
    assert results == ["done", "timeout", "done", "timeout"]


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines(resolution=0.01)

    async def guarded() -> None:
        with deadlines.within(5):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(guarded())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_expiring_a_group_ends_its_waits_at_once_and_leaves_the_others() -> None:
    deadlines = Deadlines(resolution=0.01)
    hung, sound = object(), object()

    async def wait(group: object) -> str:
        try:
            with deadlines.within(60, group):
                await asyncio.sleep(0.3)
        except TimeoutError:
            return "ended"
        return "done"

    tasks = [asyncio.ensure_future(wait(g)) for g in (hung, sound, hung)]
    await asyncio.sleep(0.02)
    assert deadlines.expire(hung) == 2
    assert deadlines.expire(hung) == 0
    assert await asyncio.wait_for(asyncio.gather(*tasks), timeout=5) == ["ended", "done", "ended"]
