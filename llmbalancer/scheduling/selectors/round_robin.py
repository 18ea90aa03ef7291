"""``round_robin``: each eligible backend in turn. Use it when backends are alike and requests are short."""

from __future__ import annotations

from collections.abc import Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.selectors.base import RequestFacts, Selector


class RoundRobin(Selector):
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        self._turn += 1
        return candidates[self._turn % len(candidates)]
