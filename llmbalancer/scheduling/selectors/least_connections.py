"""``least_connections``: the backend with the fewest requests in flight through this balancer.

Use it for backends of unknown capacity (OpenAI-compatible servers without ``/slots``); busy slots
that other clients hold, when a poll saw them, count too. Ties go to the backend that has served the
fewest requests, so an idle fleet is still spread evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.capacity import busy
from llmbalancer.scheduling.selectors.base import RequestFacts, Selector


class LeastConnections(Selector):
    name = "least_connections"

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        return min(candidates, key=lambda b: (busy(b), b.traffic.requests_total))
