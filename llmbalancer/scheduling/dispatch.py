"""Select, then claim: turn a request into a hold on one backend, or an error decided here.

Capacity is gated here, once, for every policy: a selector only ever sees routable backends with a
free slot (``capacity.has_room``). When none has one, the request waits in the admission queue and
binds to a backend when a slot frees; when none is routable and none is starting, it fails at once.

One exception, asked of the policy once per request (``Selector.hold_for``): a cache-aware policy may name
a full backend worth waiting for (it holds the request's prompt prefix). The request then waits in the
queue for that backend only, for at most the wait the policy gave, letting the waiters behind it take
other servers, and afterwards takes any free backend like everyone else.

Replicas sharing state (``ledger``, a ``claims.SlotLedger``): a claim made here is then admitted against
the fleet-wide count. Refused (another replica took the last slot first, and the ledger's answer now
shows the backend full here), it is given back and the request chooses again without losing its place in
the queue. Each replica binds freed slots to requests in its own queue, with one courtesy: while another
replica's first in line for the model has waited longer (or has a higher priority), a free slot is left to
it for up to ``_MAX_YIELD`` (it hears of the slot within milliseconds), so replicas behave as one queue
rather than each serving its own first (without it, two replicas' p99 time to first token was 1.1-1.3x one
balancer's: bench/RESULTS.md, "Replicas").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection

from llmbalancer import errors
from llmbalancer.config import QueueConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.capacity import has_room
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.admission import AdmissionQueue, Waiter
from llmbalancer.scheduling.backend_limits import BackendLimits
from llmbalancer.scheduling.claims import Claim, SlotLedger, claim_one
from llmbalancer.scheduling.fairness import priority_for, tenant_of
from llmbalancer.scheduling.model_routing import ModelRouter
from llmbalancer.scheduling.selectors import Hold, RequestFacts, Selector

# Refusals by the shared ledger in a row after which a queued request waits for the next change before
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
        self.selector = selector
        self.routing = routing or ModelRouter()
        queue = queue or QueueConfig()
        self.admission = AdmissionQueue(queue.max_size, queue.timeout)
        # Scale from zero: a request finding no backend at all waits for one to register (up to the timeout).
        self.wait_for_backends = bool(queue.wait_for_backends)
        self.backend_limits = BackendLimits(registry.notify_change)  # backends[].rpm / tpm
        registry.on_removed.append(lambda backend: self.selector.forget(backend.name))
        self.ledger: SlotLedger | None = None  # set when replicas share state (app.py)

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
        # No jumping ahead of those waiting, here or (replicas) on another replica.
        if hold is None and (retry or (not self.admission.depth(model) and not self._behind_elsewhere(facts))):
            claim = self._try_claim(facts, excluded)
            if claim is not None and await self._admitted(claim):
                return claim
        excluded = self.routing.exclusion(facts, self.registry, given, waiting=True)
        self._fail_if_hopeless(excluded)
        loop = asyncio.get_running_loop()
        # Priority (a key's caps the client's X-Priority), then fair share among keys, then arrival.
        with self.admission.waiting(model, priority_for(facts), retry, tenant_of(facts)) as waiter:
            hold_until = loop.time() + hold.wait if hold is not None else 0.0
            waiter.held_for = hold.backend if hold is not None else None
            refusals = 0
            yield_until: float | None = None  # replicas: a free slot left to an older request elsewhere, until
            self._tell_head(model)
            try:
                async with asyncio.timeout(self.admission.timeout):
                    while True:
                        held = waiter.held_for
                        if held is not None and (loop.time() >= hold_until or held not in self.candidates(excluded)):
                            waiter.held_for = held = None  # the affinity wait is over: any free backend now
                            self._tell_head(model)
                        wake_by = hold_until if held is not None else None
                        if self.admission.may_claim(waiter):
                            if held is None and not retry and self._yields(waiter, excluded):
                                if yield_until is None:
                                    yield_until = loop.time() + _MAX_YIELD
                            else:
                                yield_until = None  # no slot free, or nobody older elsewhere
                            if yield_until is not None and loop.time() < yield_until:
                                wake_by = yield_until
                            else:
                                claim = self._try_claim(facts, excluded, only=held)
                                if claim is not None:
                                    if await self._admitted(claim):
                                        return claim
                                    refusals += 1
                                    if refusals < _MAX_REFUSALS:
                                        continue  # that backend shows full now: choose again, in the same place
                        self._fail_if_hopeless(excluded)
                        if wake_by is None:
                            await self.registry.next_change()
                        else:
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(wake_by - loop.time()):
                                    await self.registry.next_change()
            except TimeoutError:
                raise errors.queue_timeout(self.admission.timeout) from None
            finally:
                self._tell_head(model, leaving=waiter)
                # The next in line re-checks now: it may be served by the slot this one did not take.
                self.registry.notify_change()

    def _behind_elsewhere(self, facts: RequestFacts) -> bool:
        """Replicas: another replica has a request for this model queued before this one (just arrived)."""
        ledger = self.ledger
        return ledger is not None and ledger.goes_first_elsewhere(facts.model or "", priority_for(facts),
                                                                  time.time())

    def _yields(self, waiter: Waiter, excluded: Collection[Backend]) -> bool:
        """Replicas: a slot is free for this waiter, and another replica's first in line goes before it."""
        ledger = self.ledger
        return (
            ledger is not None and ledger.goes_first_elsewhere(waiter.model, waiter.priority, waiter.since)
            and bool(self.eligible(excluded))
        )

    def _tell_head(self, model: str, leaving: Waiter | None = None) -> None:
        ledger = self.ledger
        if ledger is not None:
            head = self.admission.head(model, leaving)
            ledger.queue_head(model, None if head is None else (head.priority, head.since))

    async def _admitted(self, claim: Claim) -> bool:
        """Replicas: the claim fits the fleet-wide count too; refused, it is given back (``claims.SlotLedger``)."""
        ledger = self.ledger
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

    def _try_claim(
        self, facts: RequestFacts, excluded: Collection[Backend], only: Backend | None = None
    ) -> Claim | None:
        eligible = self.eligible(excluded)
        if only is not None:
            eligible = [b for b in eligible if b is only]
        return claim_one(self.registry, self.selector, eligible, facts, self.ledger, held=self.ledger is not None)

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
