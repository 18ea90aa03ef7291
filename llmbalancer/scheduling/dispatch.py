"""Select, then claim: turn a request into a hold on one backend, or an error decided here.

Capacity is gated here, once, for every policy: a selector only ever sees routable backends with a
free slot (``capacity.has_room``) under their per-minute limits (``backend_limits.py``). When one has one
and nobody waits for the request's model, the policy picks at once (request side). Otherwise the request
waits in the admission queue and is bound from the slot's side (``binding.py``): on every change of the
fleet, in the loop turn after it, free slots go to waiting requests, the policy choosing among a window of
them. When no backend is routable and none is starting, the request fails at once (unless
``queue.wait_for_backends``: then it waits for one to register, up to the queue timeout).

One exception, asked of the policy for every first attempt (``Selector.hold_for``): a cache-aware policy may
name a full backend worth waiting for (it holds the request's prompt prefix). The request then waits for
that backend only, for at most the wait the policy gave (a timer wakes the queue when it ends), letting
the waiters behind it take other servers, and afterwards takes any free backend like everyone else. It is
asked whether or not others wait: asked only when nobody waited, follow-ups arriving at a busy moment lost
their server (mixed fleet at 80 %: 68 % cache hits against 70 % asked every time, p50 0.13 against 0.09 s).

Replicas sharing state (``ledger``, a ``claims.SlotLedger``): a claim made here is then admitted against
the fleet-wide count. Refused (another replica took the last slot first, and the ledger's answer now
shows the backend full here), it is given back and the request goes back to its place in the queue. Each
replica binds freed slots to requests in its own queue, with one courtesy: while another replica's first
in line for the model has waited longer (or has a higher priority), a free slot is left to it for up to
``_MAX_YIELD`` (it hears of the slot within milliseconds), so replicas behave as one queue rather than each
serving its own first (without it, two replicas' p99 time to first token was 1.1-1.3x one balancer's:
bench/RESULTS.md, "Replicas").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection

from llmbalancer import errors
from llmbalancer.config import QueueConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.capacity import capacity, has_room
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.admission import AdmissionQueue, Waiter
from llmbalancer.scheduling.backend_limits import BackendLimits
from llmbalancer.scheduling.binding import Binder
from llmbalancer.scheduling.claims import Claim, SlotLedger, claim_one
from llmbalancer.scheduling.fairness import priority_for, tenant_of
from llmbalancer.scheduling.model_routing import ModelRouter
from llmbalancer.scheduling.selectors import Hold, RequestFacts, Selector
from llmbalancer.scheduling.service_rate import ServiceRate

# Refusals by the shared ledger in a row after which a request arriving to free slots queues instead of
# choosing again (each refusal shows the backend full here, so a second one in a row is already rare).
_MAX_REFUSALS = 8
# The longest a free slot is left to an older request queued on another replica before taking it anyway (the
# other normally claims it within a few milliseconds; this bounds the cost when it cannot use that backend).
_MAX_YIELD = 0.05


class Dispatcher:
    def __init__(
        self, registry: Registry, selector: Selector, queue: QueueConfig | None = None,
        routing: ModelRouter | None = None,
    ) -> None:
        self.registry = registry
        self._selector = selector
        self.routing = routing or ModelRouter()
        queue = queue or QueueConfig()
        self.admission = AdmissionQueue(queue.max_size, queue.timeout)
        self.rate = ServiceRate()
        self.binder = Binder(
            registry, selector, self.admission, self.rate, self._bindable, self.candidates,
            window=queue.bind_window, max_pass_over=queue.max_pass_over, yields=self._yields,
        )
        self.server_backlog = queue.server_backlog
        # Scale from zero: a request finding no backend at all waits for one to register (up to the timeout).
        self.wait_for_backends = bool(queue.wait_for_backends)
        self.backend_limits = BackendLimits(registry.notify_change)  # backends[].rpm / tpm
        self._bind_soon = False
        self._fleet_seen: tuple[object, ...] = ()
        self._yield_until: dict[str, float] = {}  # model -> until when its free slots are left to another replica
        registry.on_removed.append(lambda backend: self.selector.forget(backend.name))
        registry.on_change.append(self._changed)
        self._ledger: SlotLedger | None = None

    @property
    def selector(self) -> Selector:
        return self._selector

    @selector.setter
    def selector(self, selector: Selector) -> None:
        """The policy (a reload may change it): the binder binds with the same one."""
        self._selector = selector
        self.binder.selector = selector

    @property
    def ledger(self) -> SlotLedger | None:
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: SlotLedger | None) -> None:
        """Set when replicas share state (app.py)."""
        self._ledger = ledger
        self.binder.ledger = ledger

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot, all models together (the autoscaling signal)."""
        return self.admission.depth()

    def candidates(self, excluded: Collection[Backend]) -> list[Backend]:
        return [b for b in self.registry if b.routable and b not in excluded]

    def eligible(self, excluded: Collection[Backend] = ()) -> list[Backend]:
        """Routable backends with a free slot and a closed (or probing) circuit: all a policy is shown."""
        allows = self.registry.circuit.allows
        within = self.backend_limits.allows  # a backend at its rpm/tpm for this minute is not offered requests
        eligible = [
            b for b in self.registry if b.routable and b not in excluded and has_room(b) and allows(b)
            and ((b.rpm is None and b.tpm is None) or within(b))
        ]
        if any(b.health.gpu_busy for b in eligible):
            # Balancers behind us that report busy GPUs (/llmhealth) take work only when no idle one can.
            return [b for b in eligible if not b.health.gpu_busy] or eligible
        return eligible

    def _bindable(self, excluded: Collection[Backend]) -> list[Backend]:
        """What a waiting request may be bound to: ``eligible``, and with ``queue.server_backlog`` N, a full
        backend holding fewer of our requests in its own queue than one per N slots."""
        per = self.server_backlog
        if not per:
            return self.eligible(excluded)
        allows = self.registry.circuit.allows
        within = self.backend_limits.allows
        found = []
        for b in self.registry:
            if not b.routable or b in excluded or not allows(b):
                continue
            if (b.rpm is not None or b.tpm is not None) and not within(b):
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
        # No jumping ahead of those waiting, here or (replicas) on another replica.
        queued = bool(self.admission.depth(model)) or self._behind_elsewhere(facts)
        hold = None if retry else self._hold(facts, excluded)
        if hold is None and (retry or not queued):
            for _ in range(_MAX_REFUSALS):
                claim = self._try_claim(facts, excluded)
                if claim is None:
                    break
                if await self._admitted(claim):
                    return claim
        excluded = self.routing.exclusion(facts, self.registry, given, waiting=True)
        self._fail_if_hopeless(excluded)
        loop = asyncio.get_running_loop()

        def expected(ahead: int) -> float | None:
            return self.expected_wait(model, ahead, excluded)

        # Priority (a key's caps the client's X-Priority), then fair share among keys, then arrival.
        with self.admission.waiting(
            model, priority_for(facts), retry, tenant_of(facts), None if retry else expected, loop.time()
        ) as waiter:
            return await self._wait(waiter, facts, excluded, hold)

    async def _wait(
        self, waiter: Waiter, facts: RequestFacts, excluded: Collection[Backend], hold: Hold | None
    ) -> Claim:
        loop = asyncio.get_running_loop()
        waiter.facts, waiter.excluded, waiter.route = facts, excluded, self.routing.model_of(facts)
        waiter.deadline = loop.time() + (waiter.expected or 0.0) + self.binder.max_pass_over
        timer = None
        if hold is not None:
            waiter.held_for, waiter.hold_until = hold.backend, loop.time() + hold.wait
            timer = loop.call_at(waiter.hold_until, self._changed)  # the hold's end may let it take another
        self._tell_head(waiter.model)
        try:
            async with asyncio.timeout(self.admission.timeout):
                while True:
                    claim = await self._bound(waiter)
                    if await self._admitted(claim):
                        return claim
                    # Replicas: another replica took that slot first; back to the same place in line.
                    self.admission.put_back(waiter)
        except TimeoutError:
            raise errors.queue_timeout(self.admission.timeout) from None
        finally:
            if timer is not None:
                timer.cancel()
            self._tell_head(waiter.model, leaving=waiter)

    async def _bound(self, waiter: Waiter) -> Claim:
        """Wait until the binder hands ``waiter`` a claim (or the reason it never will)."""
        bound = waiter.bound = asyncio.get_running_loop().create_future()
        self._changed()  # a slot may be free for it now (a retry; one freed while it was placed)
        try:
            return await asyncio.shield(bound)
        except asyncio.CancelledError:
            # Timed out or its client left. Bound in the very turn it gave up: the slot goes back at once.
            if not bound.done():
                bound.cancel()  # the binder skips it from now on
            elif not bound.cancelled() and bound.exception() is None:
                bound.result().abandoned()
            raise

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
        models = self.binder.bind(asyncio.get_running_loop().time())
        for model in models:
            self._tell_head(model)

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

    def _behind_elsewhere(self, facts: RequestFacts) -> bool:
        """Replicas: another replica has a request for this model queued before this one (just arrived)."""
        ledger = self._ledger
        return ledger is not None and ledger.goes_first_elsewhere(facts.model or "", priority_for(facts),
                                                                  time.time())

    def _yields(self, head: Waiter, now: float) -> bool:
        """Replicas: leave this model's free slots to another replica's first in line, which goes before
        ``head``, for at most ``_MAX_YIELD`` (a timer binds again when that ends)."""
        ledger = self._ledger
        if ledger is None or head.retry or not ledger.goes_first_elsewhere(head.model, head.priority, head.since):
            self._yield_until.pop(head.model, None)
            return False
        until = self._yield_until.get(head.model)
        if until is None:
            until = self._yield_until[head.model] = now + _MAX_YIELD
            asyncio.get_running_loop().call_at(until, self._changed)
        if now < until:
            return True
        del self._yield_until[head.model]
        return False

    def _tell_head(self, model: str, leaving: Waiter | None = None) -> None:
        ledger = self._ledger
        if ledger is not None:
            head = self.admission.head(model, leaving)
            ledger.queue_head(model, None if head is None else (head.priority, head.since))

    async def _admitted(self, claim: Claim) -> bool:
        """Replicas: the claim fits the fleet-wide count too; refused, it is given back (``claims.SlotLedger``)."""
        ledger = self._ledger
        if ledger is None:
            return True
        try:
            admitted = await ledger.admit(claim.backend)
        except BaseException:  # cancelled (the client left) while asking: the slot is given back here
            claim.abandoned()
            raise
        if admitted:
            claim.placed()  # only now the policy learns the placement: a refused one leaves no trace
        else:
            claim.abandoned()
        return admitted

    def _hold(self, facts: RequestFacts, excluded: Collection[Backend]) -> Hold | None:
        """The policy's choice of a full backend to wait for, if it wants one."""
        allows = self.registry.circuit.allows
        full = [b for b in self.registry if b.routable and b not in excluded and allows(b) and not has_room(b)]
        return self.selector.hold_for(full, self.eligible(excluded), facts) if full else None

    def _try_claim(self, facts: RequestFacts, excluded: Collection[Backend]) -> Claim | None:
        ledger = self._ledger
        return claim_one(
            self.registry, self.selector, self.eligible(excluded), facts, ledger, self.rate, held=ledger is not None
        )

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
        """No backend healthy and none starting: 503 at once; a dead fleet does not hold requests (unless
        ``wait_for_backends``: then it waits for one to register, up to the queue timeout)."""
        if self.wait_for_backends or self.candidates(excluded):
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
