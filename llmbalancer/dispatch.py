"""Select, then claim: turn a request into a hold on one backend, or an error decided here."""

from __future__ import annotations

from collections.abc import Collection

from llmbalancer import errors
from llmbalancer.backend import Backend, BackendState
from llmbalancer.model_routing import ModelRouter
from llmbalancer.registry import Claim, Registry
from llmbalancer.selectors import RequestFacts, Selector


class Dispatcher:
    def __init__(self, registry: Registry, selector: Selector, *, routing: ModelRouter | None = None) -> None:
        self.registry = registry
        self.selector = selector
        self.routing = routing or ModelRouter()

    def candidates(self, excluded: Collection[Backend]) -> list[Backend]:
        return [b for b in self.registry if b.routable and b not in excluded]

    async def claim(self, facts: RequestFacts, excluded: Collection[Backend] = ()) -> Claim:
        """A claim on the chosen backend; the caller must release it (``with`` or ``finally``)."""
        # Only backends that serve the request's model are candidates (unknown model: 404 here).
        excluded = self.routing.exclusion(facts, self.registry, excluded)
        candidates = self.candidates(excluded)
        backend = self.selector.select(candidates, facts) if candidates else None
        if backend is None:
            raise errors.no_backend(self._why_none(excluded))
        return self.registry.claim(backend)

    def _why_none(self, excluded: Collection[Backend]) -> str:
        if not len(self.registry):
            return "No backends are configured"
        starting = sum(1 for b in self.registry if b.state is BackendState.STARTING)
        if starting:
            return f"No backend is ready yet ({starting} starting)"
        return "No healthy backend is available"
