"""``power_of_two``: two eligible backends at random, the less loaded of them wins.

A cheap baseline that avoids herding when several balancers share a fleet (each sees a stale view of
load): choosing between two random backends spreads almost as well as picking the least loaded.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.capacity import load
from llmbalancer.scheduling.selectors.base import RequestFacts, Selector


class PowerOfTwo(Selector):
    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._random = _random.Random(seed)

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._random.sample(list(candidates), 2)
        return first if (load(first), first.traffic.in_flight) <= (load(second), second.traffic.in_flight) else second
