"""``random``: any eligible backend, uniformly. A baseline for benchmarks, not a recommendation."""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.selectors.base import RequestFacts, Selector


class Random(Selector):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._random = _random.Random(seed)

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        return self._random.choice(candidates)
