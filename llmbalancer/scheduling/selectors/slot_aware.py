"""``slot_aware`` (the default): the backend with the most free slots.

Free slots = capacity (``max_concurrency``, else the polled slot count) minus this balancer's requests
in flight minus the slots other clients held at the last poll (``llmbalancer.fleet.capacity``). The
dispatcher already hides backends with no free slot, so a backend is never sent more requests than it
has slots; beyond that the request waits in the admission queue rather than in one server's FIFO.
Backends whose capacity is unknown rank after those with a known free slot, by requests in flight.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.capacity import free_slots, load
from llmbalancer.scheduling.selectors.base import RequestFacts, Selector


def slot_rank(backend: Backend) -> tuple[int, int, float, int]:
    """Smaller is better: known free slots first (most first), then lowest load, then fewest served."""
    free = free_slots(backend)
    return (0 if free is not None else 1, -(free or 0), load(backend), backend.traffic.requests_total)


class SlotAware(Selector):
    name = "slot_aware"

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        return min(candidates, key=slot_rank)
