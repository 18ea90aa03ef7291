"""Select, then claim: turn a request into a hold on one backend, or an error decided here.

Capacity is gated here, once, for every policy: a selector only ever sees routable backends with a
free slot (``capacity.has_room``). When none has one, the request waits in the admission queue and
binds to a backend when a slot frees; when none is routable and none is starting, it fails at once.

One exception, asked of the policy once per request (``Selector.hold_for``): a cache-aware policy may name
a full backend worth waiting for (it holds the request's prompt prefix). The request then waits in the
queue for that backend only, for at most the wait the policy gave, letting the waiters behind it take
other servers, and afterwards takes any free backend like everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

from llmbalancer import errors
from llmbalancer.config import QueueConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.capacity import capacity, has_room
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.admission import AdmissionQueue, priority_of
from llmbalancer.scheduling.claims import Claim, claim_one
from llmbalancer.scheduling.model_routing import ModelRouter
from llmbalancer.scheduling.selectors import Hold, RequestFacts, Selector
from llmbalancer.scheduling.service_rate import ServiceRate


class Dispatcher:
    def __init__(
        self, registry: Registry, selector: Selector, queue: QueueConfig | None = None,
        routing: ModelRouter | None = None,
    ) -> None:
        self.registry = registry
        self.selector = selector
        self.routing = routing or ModelRouter()
        queue = queue or QueueConfig()
        self.admission = AdmissionQueue(queue.max_size, queue.timeout)
        self.rate = ServiceRate()
        registry.on_removed.append(lambda backend: self.selector.forget(backend.name))

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot, all models together (the autoscaling signal)."""
        return self.admission.depth()

    def candidates(self, excluded: Collection[Backend]) -> list[Backend]:
        return [b for b in self.registry if b.routable and b not in excluded]

    def eligible(self, excluded: Collection[Backend] = ()) -> list[Backend]:
        """Routable backends with a free slot and a closed (or probing) circuit: all a policy is shown."""
        allows = self.registry.circuit.allows
        eligible = [b for b in self.registry if b.routable and b not in excluded and has_room(b) and allows(b)]
        if any(b.health.gpu_busy for b in eligible):
            # Balancers behind us that report busy GPUs (/llmhealth) take work only when no idle one can.
            return [b for b in eligible if not b.health.gpu_busy] or eligible
        return eligible

    async def claim(self, facts: RequestFacts, excluded: Collection[Backend] = ()) -> Claim:
        """A claim on the chosen backend; the caller must release it (``with`` or ``finally``)."""
        # Only backends that serve the request's model are candidates (unknown model: 404 here).
        # A retry (some backend already excluded) has had its turn: it may take any free slot at once
        # and never blocks the queue's head on a backend it may not use.
        retry = bool(excluded)
        given = excluded
        excluded = self.routing.exclusion(facts, self.registry, given)
        model = facts.model or ""
        hold = None if retry else self._hold(facts, excluded)
        if hold is None and (retry or not self.admission.depth(model)):  # no jumping ahead of those waiting
            claim = self._try_claim(facts, excluded)
            if claim is not None:
                return claim
        excluded = self.routing.exclusion(facts, self.registry, given, waiting=True)
        self._fail_if_hopeless(excluded)
        loop = asyncio.get_running_loop()
        priority = priority_of(facts.headers)
        expected = None if retry else self.expected_wait(model, self.admission.ahead(model, priority), excluded)
        with self.admission.waiting(model, priority, retry, expected) as waiter:
            hold_until = loop.time() + hold.wait if hold is not None else 0.0
            waiter.held_for = hold.backend if hold is not None else None
            try:
                async with asyncio.timeout(self.admission.timeout):
                    while True:
                        held = waiter.held_for
                        if held is not None and (loop.time() >= hold_until or held not in self.candidates(excluded)):
                            waiter.held_for = held = None  # the affinity wait is over: any free backend now
                        if self.admission.may_claim(waiter):
                            claim = self._try_claim(facts, excluded, only=held)
                            if claim is not None:
                                return claim
                        self._fail_if_hopeless(excluded)
                        if held is None:
                            await self.registry.next_change()
                        else:
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(hold_until - loop.time()):
                                    await self.registry.next_change()
            except TimeoutError:
                raise errors.queue_timeout(self.admission.timeout) from None
            finally:
                # The next in line re-checks now: it may be served by the slot this one did not take.
                self.registry.notify_change()

    def expected_wait(self, model: str, ahead: int, excluded: Collection[Backend] = ()) -> float | None:
        """Seconds a request of ``model`` with ``ahead`` waiters before it may expect to wait for a slot, from
        the fleet's measured holding time and the slots of the backends that may take it (None: not known)."""
        slots = 0
        for backend in self.candidates(excluded):
            total = capacity(backend)
            if total is None:
                return None  # a backend with no known slot count takes any number: no estimate
            slots += max(0, total - backend.health.slots_external)
        return self.rate.expected_wait(model, ahead, slots)

    def _hold(self, facts: RequestFacts, excluded: Collection[Backend]) -> Hold | None:
        """The policy's choice of a full backend to wait for, if it wants one."""
        allows = self.registry.circuit.allows
        full = [b for b in self.registry if b.routable and b not in excluded and allows(b) and not has_room(b)]
        return self.selector.hold_for(full, self.eligible(excluded), facts) if full else None

    def _try_claim(
        self, facts: RequestFacts, excluded: Collection[Backend], only: Backend | None = None
    ) -> Claim | None:
        eligible = self.eligible(excluded)
        if only is not None:
            eligible = [b for b in eligible if b is only]
        return claim_one(self.registry, self.selector, eligible, facts, self.rate)

    def _fail_if_hopeless(self, excluded: Collection[Backend]) -> None:
        """No backend healthy and none starting: 503 at once; a dead fleet does not hold requests."""
        if self.candidates(excluded):
            return
        if any(b.state is BackendState.STARTING for b in self.registry if b not in excluded):
            return
        raise errors.no_backend(self._why_none(excluded))

    def _why_none(self, excluded: Collection[Backend]) -> str:
        if not len(self.registry):
            return "No backends are configured"
        starting = sum(1 for b in self.registry if b.state is BackendState.STARTING)
        if starting:
            return f"No backend is ready yet ({starting} starting)"
        return "No healthy backend is available"
