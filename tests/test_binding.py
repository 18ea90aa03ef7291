"""Binding from the slot's side: which waiting request a freed slot goes to, ageing, and when it happens."""

from __future__ import annotations

import asyncio
from typing import Any

from llmbalancer.config import QueueConfig
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.fleet.usage import Usage
from llmbalancer.scheduling.claims import Claim
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.selectors import RequestFacts, Waiting
from llmbalancer.scheduling.selectors.prefix import Prefix
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from tests.support import occupy, wait_for


def backend(name: str, slots: int = 1) -> Backend:
    made = Backend(name=name, url=f"http://{name}", state=BackendState.HEALTHY)
    made.health.slots_total = slots
    return made


def chat(system: str, *turns: str, max_tokens: int = 16) -> RequestFacts:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    body: dict[str, Any] = {"model": "m", "messages": messages, "max_tokens": max_tokens}
    return RequestFacts("POST", "/v1/chat/completions", "test", {}, "m", body)


SHOP = "You are the support assistant of a large shop. " * 12
TUTOR = "You are a patient tutor who explains things slowly. " * 12
POET = "You write short poems about the sea, in English only. " * 12
ORDER = "My order 1234 has not arrived, where is it? " * 10
A1 = chat(SHOP, ORDER)
A2 = chat(SHOP, ORDER, "It left on Monday. " * 8, "Thanks, and then?")
B1 = chat(TUTOR, "Explain fractions to me, from the beginning. " * 10)
B2 = chat(TUTOR, "Explain fractions to me, from the beginning. " * 10, "A fraction is a part. " * 8, "Go on.")


def learned_prefix() -> Prefix:
    prefix = Prefix(max_wait=0.0)
    prefix.tokens_per_char, prefix.token_seconds = 0.25, 0.001
    return prefix


def fleet(selector: Any, *names: str, **queue: Any) -> tuple[Dispatcher, list[Backend]]:
    registry = Registry()
    backends = [registry.add(backend(name)) for name in names]
    return Dispatcher(registry, selector, QueueConfig(**queue)), backends


async def queued(dispatcher: Dispatcher, *requests: RequestFacts) -> list[asyncio.Task[Claim]]:
    """Queue the requests in this order (each waiting before the next is sent)."""
    tasks = []
    for depth, request in enumerate(requests, start=1):
        tasks.append(asyncio.create_task(dispatcher.claim(request)))
        await wait_for(lambda depth=depth: dispatcher.queue_depth == depth)
    return tasks


async def test_a_freed_slot_goes_to_the_waiting_request_whose_prefix_that_server_holds() -> None:
    prefix = learned_prefix()
    dispatcher, (a, b) = fleet(prefix, "a", "b", max_pass_over=60.0)
    prefix.claimed(a, A1)  # a holds chat A's history, b chat B's
    prefix.claimed(b, B1)
    busy_a, busy_b = occupy(dispatcher.registry, a), occupy(dispatcher.registry, b)
    new_chat, follow_b, follow_a = await queued(dispatcher, chat(POET, "The sea at night. " * 10), B2, A2)
    busy_a.release()  # a frees: the head is a new chat, but a holds A's history
    with await asyncio.wait_for(follow_a, timeout=2) as claim:
        assert claim.backend is a
        assert not new_chat.done() and not follow_b.done()
        busy_b.release()  # b frees: B's follow-up, the second in line, takes it
        with await asyncio.wait_for(follow_b, timeout=2) as claim_b:
            assert claim_b.backend is b
            assert not new_chat.done()
    with await asyncio.wait_for(new_chat, timeout=2) as claim:  # a slot freed: the new chat at last
        assert claim.backend in (a, b)


async def test_first_come_first_served_without_a_cache_aware_policy() -> None:
    dispatcher, (a, _) = fleet(SlotAware(), "a", "b")
    busy = [occupy(dispatcher.registry, x) for x in dispatcher.registry]
    first, second = await queued(dispatcher, chat(POET, "one " * 50), A2)
    busy[0].release()
    with await asyncio.wait_for(first, timeout=2) as claim:
        assert claim.backend is a and not second.done()
    busy[1].release()
    with await asyncio.wait_for(second, timeout=2):
        pass


async def test_ageing_bounds_how_long_a_request_is_passed_over() -> None:
    prefix = learned_prefix()
    dispatcher, (a, b) = fleet(prefix, "a", "b", max_pass_over=0.3)
    prefix.claimed(a, A1)
    holding, _ = occupy(dispatcher.registry, a), occupy(dispatcher.registry, b)  # b stays full throughout
    passed, follow_up = await queued(dispatcher, chat(POET, "The sea at night. " * 10), A2)
    holding.release()
    holding = await asyncio.wait_for(follow_up, timeout=2)  # passed over once
    assert holding.backend is a and not passed.done()
    (again,) = await queued_behind(dispatcher, A2, depth=2)
    holding.release()
    holding = await asyncio.wait_for(again, timeout=2)  # and again, within max_pass_over
    assert not passed.done()
    (late,) = await queued_behind(dispatcher, A2, depth=2)
    await asyncio.sleep(0.35)  # passed over longer than max_pass_over by now
    holding.release()
    with await asyncio.wait_for(passed, timeout=2) as claim:
        assert claim.backend is a
    assert not late.done()
    late.cancel()
    await asyncio.gather(late, return_exceptions=True)


async def queued_behind(dispatcher: Dispatcher, request: RequestFacts, depth: int) -> list[asyncio.Task[Claim]]:
    # A fresh facts object each time: the same chat's next request, as a client would send it.
    again = RequestFacts(request.method, request.path, request.client, {}, request.model, request.body)
    task = asyncio.create_task(dispatcher.claim(again))
    await wait_for(lambda: dispatcher.queue_depth == depth)
    return [task]


async def test_a_queued_request_is_bound_on_the_completion_itself_without_waiting_for_a_poll() -> None:
    dispatcher, (a,) = fleet(SlotAware(), "a")
    holding = occupy(dispatcher.registry, a)
    (waiting,) = await queued(dispatcher, chat(POET, "one " * 50))
    loop = asyncio.get_running_loop()
    released_at = loop.time()
    holding.release()
    turns = 0
    while not waiting.done():
        await asyncio.sleep(0)  # loop turns only: no timer, no poll
        turns += 1
        assert turns <= 5
    with waiting.result() as claim:
        assert claim.backend is a
    assert loop.time() - released_at < 0.05


async def test_a_waiter_bound_as_its_client_leaves_gives_the_slot_back() -> None:
    dispatcher, (a,) = fleet(SlotAware(), "a")
    holding = occupy(dispatcher.registry, a)
    (waiting,) = await queued(dispatcher, chat(POET, "one " * 50))
    holding.release()
    waiting.cancel()  # cancelled in the same turn the binder hands it the slot
    await asyncio.gather(waiting, return_exceptions=True)
    await asyncio.sleep(0)
    assert a.traffic.in_flight == 0 and dispatcher.queue_depth == 0


def test_prefix_binds_long_answers_to_fast_servers_and_short_ones_to_slow() -> None:
    prefix = learned_prefix()
    fast, slow = backend("fast"), backend("slow")
    for name, seconds in (("fast", 0.02), ("slow", 0.04)) * 5:  # a backend's own speed counts from 5 answers
        prefix.decoding.learn(name, Usage(prompt_tokens=10, completion_tokens=50, decode_token_seconds=seconds))
    short = chat(POET, "A sea poem. " * 10, max_tokens=10)
    long = chat(POET, "A sea poem. " * 10, max_tokens=160)
    waiting = [Waiting(short, [fast], [fast, slow]), Waiting(long, [fast], [fast, slow])]
    assert prefix.bind(waiting) == (1, fast)  # the long one saves 160 x 20 ms there
    waiting = [Waiting(long, [slow], [fast, slow]), Waiting(short, [slow], [fast, slow])]
    assert prefix.bind(waiting) == (1, slow)  # the short one loses least there


def test_decode_speeds_count_from_five_answers_and_near_speeds_count_as_one() -> None:
    decoding = learned_prefix().decoding
    a, b, c = backend("a"), backend("b"), backend("c")
    for name, seconds in (("a", 0.020), ("b", 0.025), ("c", 0.040)) * 4:
        decoding.learn(name, Usage(completion_tokens=50, decode_token_seconds=seconds))
    assert decoding.seconds(a, 100) == decoding.seconds(c, 100)  # four answers each: the fleet's speed for all
    for name, seconds in (("a", 0.020), ("b", 0.025), ("c", 0.040)):
        decoding.learn(name, Usage(completion_tokens=50, decode_token_seconds=seconds))
    assert decoding.seconds(a, 100) == decoding.seconds(b, 100) == 2.0  # within 30 %: the same speed
    assert decoding.seconds(c, 100) == 4.0  # half speed


def test_prefix_sends_a_long_answer_to_the_faster_decoder_when_the_prompt_costs_the_same() -> None:
    prefix = learned_prefix()
    fast, slow = backend("fast"), backend("slow")
    for name, seconds in (("fast", 0.02), ("slow", 0.04)) * 5:  # a backend's own speed counts from 5 answers
        prefix.decoding.learn(name, Usage(prompt_tokens=10, completion_tokens=50, decode_token_seconds=seconds))
    assert prefix.select([slow, fast], chat(POET, "A sea poem. " * 10, max_tokens=160)) is fast
    prefix.claimed(slow, A1)  # A's history is on the slow server
    short = chat(SHOP, ORDER, "It left on Monday. " * 8, "Thanks, and then?", max_tokens=8)
    assert prefix.select([slow, fast], short) is slow  # a short answer goes home: re-reading costs more
    long = chat(SHOP, ORDER, "It left on Monday. " * 8, "Thanks, and then?", max_tokens=160)
    assert prefix.select([slow, fast], long) is slow  # the history decides; speed only breaks ties


async def test_a_queued_request_fails_at_once_when_no_backend_is_left_to_serve_it() -> None:
    dispatcher, (a,) = fleet(SlotAware(), "a")
    with occupy(dispatcher.registry, a):
        (waiting,) = await queued(dispatcher, chat(POET, "one " * 50))
        dispatcher.registry.set_state(a, BackendState.UNHEALTHY, "refused")
        done, _ = await asyncio.wait([waiting], timeout=2)
        assert done and isinstance(waiting.exception(), ProxyError)
        assert waiting.exception().code == "no_backend_available"  # type: ignore[union-attr]
        assert dispatcher.queue_depth == 0


async def test_server_backlog_lets_a_full_server_hold_one_queued_request_per_n_slots() -> None:
    dispatcher, (a,) = fleet(SlotAware(), "a", server_backlog=2)
    a.health.slots_total = 2
    busy = [occupy(dispatcher.registry, a), occupy(dispatcher.registry, a)]
    first, second, third = await queued_or_bound(dispatcher, 3)
    with await asyncio.wait_for(first, timeout=2) as claim:  # bound into the server's own queue at once
        assert claim.backend is a and a.traffic.in_flight == 3
        await asyncio.sleep(0.05)
        assert not second.done() and not third.done()  # two slots: one request in its own queue, no more
    for task in (second, third):
        task.cancel()
    await asyncio.gather(second, third, return_exceptions=True)
    for claim in busy:
        claim.release()


async def queued_or_bound(dispatcher: Dispatcher, count: int) -> list[asyncio.Task[Claim]]:
    tasks = [asyncio.create_task(dispatcher.claim(chat(POET, f"request {i} " * 40))) for i in range(count)]
    await asyncio.sleep(0.05)
    return tasks
