"""Select, then claim: turn a request into a hold on one backend, or an error decided here.

Capacity is gated here, once, for every policy: a selector only ever sees routable backends with a
free slot (``capacity.has_room``). When one has one and nobody waits for the request's model, the
policy picks at once (request side). Otherwise the request waits in the admission queue and is bound
from the slot's side (``binding.py``): on every change of the fleet, in the loop turn after it, free
slots go to waiting requests, the policy choosing among a window of them. When no backend is routable
and none is starting, the request fails at once.

One exception, asked of the policy when nobody waits (``Selector.hold_for``): a cache-aware policy may
name a full backend worth waiting for (it holds the request's prompt prefix). The request then waits for
that backend only, for at most the wait the policy gave (a timer wakes the queue when it ends), letting
the waiters behind it take other servers, and afterwards takes any free backend like everyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from llmbalancer import errors
from llmbalancer.config import QueueConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.capacity import capacity, has_room
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.admission import AdmissionQueue, Waiter, priority_of
from llmbalancer.scheduling.binding import Binder
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
        self.binder = Binder(
            registry, selector, self.admission, self.rate, self._bindable, self.candidates,
            window=queue.bind_window, max_pass_over=queue.max_pass_over,
        )
        self._backlog_per = queue.server_backlog
        self._bind_soon = False
        self._fleet_seen: tuple[object, ...] = ()
        registry.on_removed.append(lambda backend: self.selector.forget(backend.name))
        registry.on_change.append(self._changed)

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

    def _bindable(self, excluded: Collection[Backend]) -> list[Backend]:
        """What a waiting request may be bound to: ``eligible``, and with ``queue.server_backlog`` N, a full
        backend holding fewer of our requests in its own queue than one per N slots."""
        per = self._backlog_per
        if not per:
            return self.eligible(excluded)
        allows = self.registry.circuit.allows
        found = []
        for b in self.registry:
            if not b.routable or b in excluded or not allows(b):
                continue
            total = capacity(b)
            if total is None or b.traffic.in_flight + b.health.slots_external < total + max(1, total // per):
                found.append(b)
        return found

    async def claim(self, facts: RequestFacts, excluded: Collection[Backend] = ()) -> Claim:
        """A claim on the chosen backend; the caller must release it (``with`` or ``finally``)."""
        # Only backends that serve the request's model are candidates (unknown model: 404 here).
        # A retry (some backend already excluded) has had its turn: it may take any free slot at once.
        retry = bool(excluded)
        given = excluded
        excluded = self.routing.exclusion(facts, self.registry, given)
        model = facts.model or ""
        queued = bool(self.admission.depth(model))
        hold = None if retry or queued else self._hold(facts, excluded)
        if hold is None and (retry or not queued):  # no jumping ahead of those waiting
            claim = self._try_claim(facts, excluded)
            if claim is not None:
                return claim
        excluded = self.routing.exclusion(facts, self.registry, given, waiting=True)
        self._fail_if_hopeless(excluded)
        priority = priority_of(facts.headers)
        expected = None if retry else self.expected_wait(model, self.admission.ahead(model, priority), excluded)
        with self.admission.waiting(model, priority, retry, expected) as waiter:
            return await self._wait(waiter, facts, excluded, hold, expected)

    async def _wait(
        self, waiter: Waiter, facts: RequestFacts, excluded: Collection[Backend], hold: Hold | None,
        expected: float | None,
    ) -> Claim:
        loop = asyncio.get_running_loop()
        waiter.facts, waiter.excluded, waiter.route = facts, excluded, self.routing.model_of(facts)
        waiter.since = loop.time()
        waiter.deadline = waiter.since + (expected or 0.0) + self.binder.max_pass_over
        bound = waiter.bound = loop.create_future()
        timer = None
        if hold is not None:
            waiter.held_for, waiter.hold_until = hold.backend, loop.time() + hold.wait
            timer = loop.call_at(waiter.hold_until, self._changed)  # the hold's end may let it take another
        self._changed()  # a slot may be free for it now (a retry; one freed while it was placed)
        taken = False
        try:
            try:
                async with asyncio.timeout(self.admission.timeout):
                    await asyncio.shield(bound)
            except TimeoutError:
                if not (bound.done() and not bound.cancelled() and bound.exception() is None):
                    raise errors.queue_timeout(self.admission.timeout) from None
                # bound in the very turn the wait ran out: it takes the slot
            claim = bound.result()
            taken = True
            return claim
        finally:
            if timer is not None:
                timer.cancel()
            if not taken:
                if not bound.done():
                    bound.cancel()  # the binder skips it from now on
                elif not bound.cancelled() and bound.exception() is None:
                    bound.result().abandoned()  # bound just as its client left: the slot goes back at once

    def _changed(self) -> None:
        """A change of the fleet (or a hold's end): bind waiting requests in the next loop turn, once."""
        if self._bind_soon or not self.admission.depth():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop, so no waiter either
        self._bind_soon = True
        loop.call_soon(self._bind)

    def _bind(self) -> None:
        self._bind_soon = False
        self._fail_hopeless_waiters()
        self.binder.bind(asyncio.get_running_loop().time())

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

    def _try_claim(self, facts: RequestFacts, excluded: Collection[Backend]) -> Claim | None:
        return claim_one(self.registry, self.selector, self.eligible(excluded), facts, self.rate)

    def _fail_hopeless_waiters(self) -> None:
        """When the fleet's states changed: a waiter no backend can serve any more fails now (503)."""
        seen = tuple((b, b.state) for b in self.registry)
        if seen == self._fleet_seen:
            return
        self._fleet_seen = seen
        for waiter in self.admission.waiters():
            if waiter.open:
                try:
                    self._fail_if_hopeless(waiter.excluded)
                except errors.ProxyError as error:
                    assert waiter.bound is not None
                    waiter.bound.set_exception(error)

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
