"""Racing (hedged requests): send one request to the N best backends, keep the first to answer.

Enabled per route (``routing.models``: ``pattern: {race: N}``), off by default: generation calls
are safe to send twice and the losers' work is wasted by design, bought for a lower time to first
token when backends differ in speed or load. The request first claims its backend as usual
(queueing if need be); the extra racers are only backends the policy would pick *now* that are
routable, may serve the model and have room (a race never waits for one). Each racer is sent the
body with its own model name. "Answers" means response headers: llama.cpp and Ollama send them
with the first token of a stream (and with the whole answer otherwise). The first status below
500 wins, and its backend's health score the fastest-response bonus; every other racer's request
is cancelled or its response closed at once, so the backend sees the disconnect and frees its
slot, and its claim is released. When no racer answers well, the first-claimed backend's outcome
goes on to the proxy's usual retry logic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol, TypeVar

import structlog

from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.claims import Claim, claim_one
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.selectors import RequestFacts

log = structlog.get_logger("llmbalancer.scheduling.racing")



class Answer(Protocol):
    """A backend's response head, as the relay's leg opened it (aiohttp's, or the lean relay's)."""

    @property
    def status(self) -> int: ...
    def close(self) -> None: ...


A = TypeVar("A", bound=Answer)
_RETRYABLE = 500


class Racing:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def open(
        self, primary: Claim, facts: RequestFacts, excluded: Collection[Backend], replayable: bool,
        opener: Callable[[Backend], Awaitable[A]],
    ) -> tuple[Claim, A]:
        """The claim and response of the backend that answered first (``primary`` alone when not racing)."""
        racers = self._dispatcher.routing.race_for(facts) if replayable else 1
        extras = self._extra_claims(racers - 1, primary, facts, excluded) if racers > 1 else []
        if not extras:
            return primary, await opener(primary.backend)
        claim, response = await _first_answer([primary, *extras], opener)
        if response.status < _RETRYABLE:
            self._dispatcher.registry.circuit.won_race(claim.backend)
        return claim, response

    def _extra_claims(
        self, count: int, primary: Claim, facts: RequestFacts, excluded: Collection[Backend]
    ) -> list[Claim]:
        dispatcher = self._dispatcher
        taken = [*excluded, primary.backend]
        claims: list[Claim] = []
        for _ in range(count):
            allowed = dispatcher.routing.exclusion(facts, dispatcher.registry, taken)
            candidates = dispatcher.eligible(allowed)  # routable, serves the model, a free slot now
            claim = claim_one(
                dispatcher.registry, dispatcher.selector, candidates, facts, dispatcher.ledger, dispatcher.rate
            )
            if claim is None:
                break
            claims.append(claim)
            taken.append(claim.backend)
        return claims


async def _first_answer(claims: list[Claim], opener: Callable[[Backend], Awaitable[A]]) -> tuple[Claim, A]:
    tasks: list[asyncio.Future[A]] = [asyncio.ensure_future(opener(c.backend)) for c in claims]
    winner: int | None = None
    try:
        pending = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for index, task in enumerate(tasks):
                if task in done and task.exception() is None and task.result().status < _RETRYABLE:
                    winner = index
                    break
        if winner is None:
            winner = 0  # nobody answered well: the first-claimed backend's outcome is judged as usual
    finally:
        losers = [i for i in range(len(tasks)) if i != winner]
        for i in losers:
            tasks[i].cancel()
        await asyncio.gather(*(tasks[i] for i in losers), return_exceptions=True)
        for i in losers:
            task = tasks[i]
            if not task.cancelled() and task.exception() is None:
                task.result().close()  # drops the connection: the backend stops and frees its slot
            claims[i].release()
    response = tasks[winner].result()  # the first-claimed backend's error, when none answered
    log.debug("race_decided", winner=claims[winner].backend.name, racers=len(claims))
    return claims[winner], response
