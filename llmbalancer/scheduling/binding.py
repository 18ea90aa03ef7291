"""Binding from the slot's side: when slots free while requests wait, which waiting request takes which.

The dispatcher runs a pass on every change of the fleet (``Registry.on_change``: a claim released, a
backend ready, a slot count polled), in the event-loop turn after the change itself: a queued request is
bound on the completion that freed its slot, never on a timer. A pass repeats, per model queue, until no
waiter can take a free slot:

1. The *window*: from the head of the queue, in queue order, the first ``window`` waiters that may take one
   of the backends with a free slot now (routable, serving their model, circuit allowing, a held waiter
   only its holder until its hold ends), all of the head's priority (a higher priority is never passed).
2. A retry (it had its turn) is bound first; then a waiter past its *deadline* (ageing), on the backend
   ``select`` picks for it. The deadline is set when it joins the queue: the wait expected for it in
   first-come-first-served order (``ServiceRate``: the waiters ahead of it, the fleet's measured rate), plus
   ``max_pass_over`` seconds. So nobody waits more than about ``max_pass_over`` longer than first come,
   first served would have kept it, for the sake of others (and as first come, first served, once late).
3. Otherwise the policy picks the pair (``Selector.bind``): ``prefix`` by arrival, a request counting as
   having come earlier the more prompt reading the freed server saves it (a follow-up whose history it
   holds), later the more it would lose there; the others the head.

The claim is made here (``claim_on``), the waiter leaves the queue at once and gets the claim through its
future; a waiter that left meanwhile (its client hung up, it timed out) is skipped, and one bound just as it
left releases the claim itself (the dispatcher), so every claim is released exactly once. With replicas
sharing state the claim is made *held* (``ledger``): the dispatcher has it admitted fleet-wide before the
request goes, and puts the waiter back in its place if it is refused; and while another replica's first in
line goes before ours (``yields``), only retries are bound here, for a moment.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.admission import AdmissionQueue, Waiter
from llmbalancer.scheduling.claims import SlotLedger, claim_on
from llmbalancer.scheduling.selectors import Selector, Waiting
from llmbalancer.scheduling.service_rate import ServiceRate

Backends = Callable[[Collection[Backend]], list[Backend]]
# (the first in line of a model's queue, now) -> True while that model's free slots are left to another replica.
Yields = Callable[[Waiter, float], bool]


class Binder:
    __slots__ = ("_admission", "_candidates", "_eligible", "_rate", "_registry", "_yields", "ledger", "max_pass_over",
                 "selector", "window")

    def __init__(
        self,
        registry: Registry,
        selector: Selector,
        admission: AdmissionQueue,
        rate: ServiceRate,
        eligible: Backends,
        candidates: Backends,
        window: int = 16,
        max_pass_over: float = 2.0,
        yields: Yields | None = None,
    ) -> None:
        self._registry = registry
        self.selector = selector
        self._admission = admission
        self._rate = rate
        self._eligible = eligible  # excluded -> backends with a free slot a waiter may take now
        self._candidates = candidates  # excluded -> routable backends a waiter may take, free or full
        self.window = max(1, window)
        self.max_pass_over = max_pass_over
        self._yields = yields
        self.ledger: SlotLedger | None = None  # replicas: claims are made held, admitted by the dispatcher

    def bind(self, now: float) -> set[str]:
        """Bind waiters to free slots until none can take one; ``now`` in loop time. Returns the models whose
        queues it took waiters from."""
        models: set[str] = set()
        if not self._eligible(()):
            return models  # no free slot anywhere (the common wake-up while full): nothing to look at
        ledger = self.ledger
        for queue in self._admission.queues():
            retries_only = False
            if self._yields is not None:
                head = self._admission.head(queue[0].model) if queue else None
                retries_only = head is not None and self._yields(head, now)
            while queue:
                picked = self._pick(queue, now, retries_only)
                if picked is None:
                    break
                waiter, backend = picked
                assert waiter.facts is not None and waiter.bound is not None
                claim = claim_on(
                    self._registry, self.selector, backend, waiter.facts, ledger, self._rate, held=ledger is not None
                )
                self._admission.take(waiter)
                waiter.bound.set_result(claim)
                models.add(waiter.model)
        return models

    def _pick(self, queue: list[Waiter], now: float, retries_only: bool = False) -> tuple[Waiter, Backend] | None:
        free_by_route: dict[str | None, list[Backend]] = {}
        window: list[tuple[Waiter, Sequence[Backend]]] = []
        top: int | None = None
        for waiter in queue:
            if top is not None and waiter.priority < top:
                break
            if not waiter.open or (retries_only and not waiter.retry):
                continue  # leaving (its ``with`` block takes it out), or not a retry while yielding
            free = self._free(waiter, free_by_route, now)
            if not free:
                continue
            if waiter.retry or now >= waiter.deadline:
                assert waiter.facts is not None
                backend = self.selector.select(free, waiter.facts)
                if backend is not None:
                    return waiter, backend
                continue
            window.append((waiter, free))
            top = waiter.priority
            if len(window) >= self.window:
                break
        if not window:
            return None
        allowed_by_route: dict[str | None, list[Backend]] = {}
        shown = []
        for waiter, free in window:
            assert waiter.facts is not None
            if waiter.route not in allowed_by_route:
                allowed_by_route[waiter.route] = self._candidates(waiter.excluded)
            shown.append(Waiting(waiter.facts, free, allowed_by_route[waiter.route], now - waiter.joined))
        choice = self.selector.bind(shown)
        if choice is None:
            return None
        index, backend = choice
        return window[index][0], backend

    def _free(self, waiter: Waiter, free_by_route: dict[str | None, list[Backend]], now: float) -> Sequence[Backend]:
        if waiter.retry:
            free = self._eligible(waiter.excluded)  # its own exclusions: the backends it failed on
        elif waiter.route in free_by_route:
            free = free_by_route[waiter.route]  # one model's waiters may take the same backends
        else:
            free = free_by_route[waiter.route] = self._eligible(waiter.excluded)
        held = waiter.held_for
        if held is not None:
            if now < waiter.hold_until and held.routable:
                return [held] if held in free else []
            waiter.held_for = None  # the affinity wait is over: any free backend now
        return free
