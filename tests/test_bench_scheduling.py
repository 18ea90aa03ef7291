"""The scheduling benchmark's own arithmetic: deferred time while another server was free, carried load,
and a seeded workload that replays identically."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import scheduling  # bench/ is not a package: imported from its folder
import workload


def test_deferred_time_counts_as_misqueued_only_while_another_server_has_a_free_slot() -> None:
    # server 0 (1 slot): busy from 0, one request deferred from 1 to 3. server 1 (1 slot): busy from 2 to 4.
    timelines = [
        [[0.0, 1, 0], [1.0, 1, 1], [3.0, 1, 0], [5.0, 0, 0]],
        [[2.0, 1, 0], [4.0, 0, 0]],
    ]
    wasted, total = scheduling.misqueued_seconds(timelines, [1, 1])
    assert total == 2.0  # deferred 1 -> 3
    assert wasted == 1.0  # of which 1 -> 2, while server 1 was idle


def test_busy_share_is_the_share_of_slot_seconds_in_use() -> None:
    timelines = [[[0.0, 2, 0], [5.0, 1, 0]], [[0.0, 0, 0]]]
    # 2 servers x 2 slots over [0, 10]: server 0 has 2 busy for 5 s and 1 for 5 s -> 15 of 40 slot-seconds
    assert scheduling.busy_share(timelines, [2, 2], 0.0, 10.0) == 15 / 40


def test_the_workload_is_seeded_and_shares_system_prompts() -> None:
    shape = workload.Shape()
    first = workload.sessions(shape, seed=3, session_rate=2.0, window_s=10.0)
    assert first == workload.sessions(shape, seed=3, session_rate=2.0, window_s=10.0)
    assert len({s.system for s in first}) <= shape.system_prompts < len(first)
    assert all(s.start_s < 10.0 for s in first)
    assert all(shape.turns[0] <= len(s.turns) <= shape.turns[1] for s in first)
