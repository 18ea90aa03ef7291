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


def test_idle_while_waiting_counts_idle_slots_only_while_a_sent_request_is_not_in_a_slot() -> None:
    import sched_figures

    # One server, 2 slots, over [0, 10]: one slot busy from 0 to 10, the other from 4 to 10. Three requests
    # were sent at 0, 1 and 3 and ended at 10: from 1 to 4 one request waited while a slot was idle (3 s),
    # although from 3 to 4 two waited (still one idle slot). 3 of 20 slot-seconds.
    timelines = [[[0.0, 1, 0], [4.0, 2, 0], [10.0, 0, 0]]]
    requests = [(0.0, 10.0), (1.0, 10.0), (3.0, 10.0)]
    assert sched_figures.idle_while_waiting(timelines, [2], requests, 0.0, 10.0) == 3 / 20


def test_the_oracle_hit_ratio_reuses_each_history_and_every_system_prompt_seen_before() -> None:
    import sched_figures

    shape = workload.Shape(system_prompts=1, turns=(2, 2))
    one = workload.sessions(shape, seed=3, session_rate=1.0, window_s=3.0)
    ratio = sched_figures.oracle_hit_ratio([one])
    assert 0.5 < ratio < 1.0
    # Alone, a chat's first turn reuses nothing: less than with others sharing its system prompt before it.
    assert sched_figures.oracle_hit_ratio([[one[0]]]) < ratio
