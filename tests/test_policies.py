"""The scheduling policies as pure functions of backends and request facts, plus the shared capacity gate."""

from __future__ import annotations

import asyncio
from typing import Any

from llmbalancer.config import PolicyConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.capacity import free_slots, has_room
from llmbalancer.fleet.registry import Registry
from llmbalancer.fleet.usage import Usage, read_usage
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.scheduling.selectors import make_selector, policy_problems
from llmbalancer.scheduling.selectors.base import Hold, RequestFacts
from llmbalancer.scheduling.selectors.follow_ups import FollowUps
from llmbalancer.scheduling.selectors.least_connections import LeastConnections
from llmbalancer.scheduling.selectors.power_of_two import PowerOfTwo
from llmbalancer.scheduling.selectors.prefix import Prefix
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from llmbalancer.scheduling.selectors.sticky import Sticky, session_name
from tests.support import occupy, wait_for


def backend(name: str, slots: int | None = 2, in_flight: int = 0, slots_external: int = 0, **extra: Any) -> Backend:
    made = Backend(name=name, url=f"http://{name}", state=BackendState.HEALTHY, **extra)
    made.health.slots_total = slots
    made.health.slots_external = slots_external
    made.traffic.in_flight = in_flight
    return made


def facts(
    body: dict[str, Any] | None = None, headers: dict[str, str] | None = None, client: str = "10.0.0.1"
) -> RequestFacts:
    body = body or {}
    return RequestFacts("POST", "/v1/chat/completions", client, headers or {}, body.get("model"), body)


def conversation(turns: int, system: str = "You are a helpful assistant. " * 20) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn}: " + "tell me more about it " * 10})
        messages.append({"role": "assistant", "content": f"answer {turn}: " + "here is more about it " * 10})
    messages.append({"role": "user", "content": "and then?"})
    return {"model": "m", "messages": messages}


def test_free_slots_count_our_requests_and_other_clients() -> None:
    b = backend("a", slots=4, in_flight=1, slots_external=2)
    assert free_slots(b) == 1 and has_room(b)
    b.traffic.in_flight = 2
    assert free_slots(b) == 0 and not has_room(b)
    assert has_room(backend("unknown", slots=None, in_flight=50))


def test_max_concurrency_overrides_the_polled_slots() -> None:
    b = backend("a", slots=8, in_flight=2, max_concurrency=2)
    assert not has_room(b)


def test_the_dispatcher_shows_policies_only_backends_with_a_free_slot() -> None:
    registry = Registry()
    full = registry.add(backend("full", slots=1, in_flight=1))
    free = registry.add(backend("free", slots=1))
    registry.set_state(registry.add(backend("down", slots=1)), BackendState.UNHEALTHY)
    dispatcher = Dispatcher(registry, SlotAware())
    assert dispatcher.eligible() == [free]
    assert full not in dispatcher.eligible()


def test_slot_aware_prefers_most_free_slots() -> None:
    a, b = backend("a", slots=4, in_flight=3), backend("b", slots=2, in_flight=0)
    assert SlotAware().select([a, b], facts()) is b


def test_least_connections_prefers_fewest_in_flight() -> None:
    a, b = backend("a", in_flight=2), backend("b", in_flight=1)
    assert LeastConnections().select([a, b], facts()) is b


def test_power_of_two_picks_the_less_loaded_of_two() -> None:
    a, b = backend("a", in_flight=2), backend("b", in_flight=0)
    assert all(PowerOfTwo(seed=s).select([a, b], facts()) is b for s in range(10))


def test_session_key_order_header_then_user_then_system_name_then_client() -> None:
    body = {"model": "m", "user": "bob", "messages": [{"role": "system", "content": "The user is carol."}]}
    assert session_name(facts(body, {"X-Session-ID": "s1"})).endswith("session:s1")
    assert session_name(facts(body)).endswith("user:bob")
    body.pop("user")
    assert session_name(facts(body)).endswith("user:carol")
    assert session_name(facts({"model": "m"})).endswith("client:10.0.0.1")
    assert session_name(facts({"model": "m"})) != session_name(facts({"model": "other"}))


def test_sticky_keeps_a_session_on_its_backend_then_fails_over_and_repins() -> None:
    clock = [0.0]
    sticky = Sticky(SlotAware(), ttl=180, clock=lambda: clock[0])
    a, b, c = backend("a"), backend("b"), backend("c")
    request = facts({"model": "m"}, {"X-Session-ID": "alice"})
    first = sticky.select([a, b, c], request)
    assert first is not None
    sticky.claimed(first, request)
    first.traffic.in_flight = 1  # now the most loaded: slot_aware alone would go elsewhere
    assert sticky.select([a, b, c], request) is first
    others = [x for x in (a, b, c) if x is not first]
    second = sticky.select(others, request)  # pinned backend unhealthy or full
    assert second in others
    assert second is not None
    sticky.claimed(second, request)
    assert sticky.select([a, b, c], request) is second
    clock[0] += 181
    assert sticky.pinned(request) is None


def test_policy_names_and_sticky_wrapping() -> None:
    assert isinstance(make_selector(PolicyConfig(name="sticky")), Sticky)
    wrapped = make_selector(PolicyConfig(name="sticky:prefix"))
    assert isinstance(wrapped, Sticky) and isinstance(wrapped.inner, Prefix)
    assert policy_problems(PolicyConfig(name="sticky", inner="prefix")) == []
    assert policy_problems(PolicyConfig(name="nope"))
    assert policy_problems(PolicyConfig(name="slot_aware", inner="prefix"))


def test_prefix_sends_a_follow_up_turn_to_the_backend_holding_its_history() -> None:
    prefix = Prefix()
    a, b = backend("a"), backend("b")
    turn1 = facts(conversation(1))
    chosen = prefix.select([a, b], turn1)
    assert chosen is not None
    prefix.claimed(chosen, turn1)
    other = b if chosen is a else a
    chosen.traffic.in_flight = 1  # slightly busier: affinity still wins within max_imbalance
    assert prefix.select([a, b], facts(conversation(2))) is chosen
    chosen.traffic.in_flight = 5  # far busier than the other candidate: load wins, for this request only
    assert prefix.select([a, b], facts(conversation(2))) is other


def test_prefix_sends_unrelated_prompts_to_the_least_loaded() -> None:
    prefix = Prefix()
    a, b = backend("a", in_flight=1), backend("b")
    prefix.claimed(a, facts(conversation(1)))
    unrelated = facts(conversation(1, system="Completely different instructions here. " * 20))
    assert prefix.select([a, b], unrelated) is b


def test_prefix_resets_a_backend_index_when_cache_n_shows_it_lost_its_cache() -> None:
    prefix = Prefix()
    a = backend("a")
    turn1 = facts(conversation(1))
    prefix.claimed(a, turn1)
    turn2 = facts(conversation(2))
    prefix.claimed(a, turn2)
    prefix.completed(a, turn2, Usage(prompt_tokens=400, completion_tokens=4, cached_tokens=0))
    assert prefix.resets == 1
    healthy_hit = facts(conversation(3))
    prefix.claimed(a, healthy_hit)
    prefix.completed(a, healthy_hit, Usage(prompt_tokens=500, completion_tokens=4, cached_tokens=390))
    assert prefix.resets == 1


def test_usage_is_read_from_a_llama_cpp_finish_chunk_timings() -> None:
    tail = (
        b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":"chat.completion.chunk",'
        b'"timings":{"cache_n":24,"prompt_n":1,"prompt_ms":5.1,"predicted_n":4,"predicted_ms":30.0}}\n\n'
        b"data: [DONE]\n\n"
    )
    usage = read_usage(tail)
    assert usage is not None and usage.prompt_token_seconds is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (25, 4, 24)
    assert abs(usage.prompt_token_seconds - 0.0051) < 1e-9  # prompt_ms / prompt_n, in seconds


def test_usage_is_read_from_an_openai_usage_object() -> None:
    tail = (
        b'"usage":{"completion_tokens":8,"prompt_tokens":25,"total_tokens":33,'
        b'"prompt_tokens_details":{"cached_tokens":3}}}'
    )
    assert read_usage(tail) == Usage(prompt_tokens=25, completion_tokens=8, cached_tokens=3)
    assert read_usage(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n') is None


def learned(prefix: Prefix, token_seconds: float = 0.1) -> Prefix:
    """As if it had seen completions: ~4 characters a token, ``token_seconds`` to evaluate one."""
    prefix.tokens_per_char, prefix.token_seconds = 0.25, token_seconds
    return prefix


def test_prefix_asks_to_wait_for_a_full_holder_only_when_no_free_server_has_the_prefix() -> None:
    prefix = learned(Prefix(max_wait=2.0))
    holder, other = backend("holder", in_flight=2), backend("other")
    prefix.claimed(holder, facts(conversation(1)))
    follow_up = facts(conversation(2))
    assert prefix.hold_for([holder], [other], follow_up) == Hold(holder, 2.0)
    unrelated = facts(conversation(1, system="Completely different instructions here. " * 20))
    assert prefix.hold_for([holder], [other], unrelated) is None  # nothing to save: no wait
    prefix.claimed(other, facts(conversation(1)))
    assert prefix.hold_for([holder], [other], follow_up) is None  # a free server saves as much at once
    never = learned(Prefix(max_wait=0.0))
    never.claimed(holder, facts(conversation(1)))
    assert never.hold_for([holder], [backend("free")], follow_up) is None


def test_prefix_does_not_wait_for_a_holder_expected_to_stay_full_longer_than_the_wait_saves() -> None:
    prefix = learned(Prefix(max_wait=2.0))
    holder, other = backend("holder", in_flight=2), backend("other")
    prefix.claimed(holder, facts(conversation(1)))
    follow_up = facts(conversation(2))
    assert prefix.hold_for([holder], [other], follow_up) == Hold(holder, 2.0)  # no decode speed known: it waits
    # Answers of 100 tokens at 1 s a token: the holder's next free slot is ~33 s away (2 busy), far more than the
    # prompt reading the wait would save, so with a server free now the follow-up goes there.
    prefix.decoding.learn("holder", Usage(prompt_tokens=10, completion_tokens=100, decode_token_seconds=1.0))
    assert prefix.hold_for([holder], [other], follow_up) is None
    # With no server free it waits in the queue anyway: waiting for the holder there costs nothing more.
    assert prefix.hold_for([holder], [], follow_up) == Hold(holder, 2.0)


def test_prefix_waits_no_longer_than_the_prefill_it_saves_as_learned_from_timings() -> None:
    prefix = Prefix(max_wait=30.0)
    holder, other = backend("holder", in_flight=2), backend("other")
    turn1 = facts(conversation(1))
    prefix.claimed(holder, turn1)
    assert prefix.hold_for([holder], [other], facts(conversation(2))) is None  # no cost known yet: no wait
    prefix.completed(holder, turn1, Usage(prompt_tokens=300, completion_tokens=4, cached_tokens=0,
                                          prompt_token_seconds=0.002))
    hold = prefix.hold_for([holder], [other], facts(conversation(2)))
    assert hold is not None and hold.backend is holder
    matched = prefix.match(holder, prefix.chain(facts(conversation(2))))
    expected = prefix.prefill_seconds(matched, holder)
    assert expected is not None and abs(hold.wait - expected) < 1e-9 and hold.wait < 30.0
    assert hold.wait < 300 * 0.002 * 2  # about the prompt it would re-read, far below the cap


def test_sticky_delegates_the_wait_to_its_inner_policy() -> None:
    holder, other = backend("holder", in_flight=2), backend("other")
    over_prefix = Sticky(learned(Prefix(max_wait=1.0)))
    over_prefix.claimed(holder, facts(conversation(1)))
    assert over_prefix.hold_for([holder], [other], facts(conversation(2))) == Hold(holder, 1.0)
    over_slots = Sticky(SlotAware())
    over_slots.claimed(holder, facts(conversation(1)))
    assert over_slots.hold_for([holder], [other], facts(conversation(2))) is None


def _held_dispatcher(max_wait: float) -> tuple[Dispatcher, Backend, Backend]:
    registry = Registry()
    holder = registry.add(backend("holder", slots=1))
    other = registry.add(backend("other", slots=1))
    prefix = learned(Prefix(max_wait=max_wait))
    prefix.claimed(holder, facts(conversation(1)))
    return Dispatcher(registry, prefix), holder, other


async def test_a_follow_up_waits_for_its_full_holder_when_it_frees_within_the_bound() -> None:
    dispatcher, holder, _ = _held_dispatcher(max_wait=5.0)
    busy = occupy(dispatcher.registry, holder)
    waiting = asyncio.create_task(dispatcher.claim(facts(conversation(2))))
    await wait_for(lambda: dispatcher.queue_depth == 1)
    assert not waiting.done()  # other is free, yet it waits for holder
    busy.release()
    with await asyncio.wait_for(waiting, timeout=2) as claim:
        assert claim.backend is holder


async def test_a_follow_up_goes_elsewhere_when_its_holder_stays_full_past_the_bound() -> None:
    dispatcher, holder, other = _held_dispatcher(max_wait=0.1)
    with occupy(dispatcher.registry, holder), await asyncio.wait_for(
        dispatcher.claim(facts(conversation(2))), timeout=2
    ) as claim:
        assert claim.backend is other


async def test_a_held_request_does_not_block_the_queue_behind_it() -> None:
    dispatcher, holder, other = _held_dispatcher(max_wait=5.0)
    with occupy(dispatcher.registry, holder):
        held = asyncio.create_task(dispatcher.claim(facts(conversation(2))))
        await wait_for(lambda: dispatcher.queue_depth == 1)
        unrelated = facts(conversation(1, system="Completely different instructions here. " * 20))
        with await asyncio.wait_for(dispatcher.claim(unrelated), timeout=2) as claim:
            assert claim.backend is other  # went past the held waiter to the free server
        assert not held.done()
    with await asyncio.wait_for(held, timeout=2) as claim:
        assert claim.backend is holder


def chat(system: str, *turns: str) -> RequestFacts:
    """A chat's request: the system prompt, then ``turns`` alternating user / assistant, ending with a user's."""
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return facts({"model": "m", "messages": messages})


SYSTEM = "You are the support assistant of a large shop. " * 12
DONE = Usage(prompt_tokens=300, completion_tokens=20, cached_tokens=None)


def test_prefix_places_a_new_chat_away_from_waiting_chats_of_its_system_prompt() -> None:
    """llama.cpp lets a new chat with the same system prompt take a waiting chat's slot and so lose its history:
    a new chat goes where no chat of its family waits between turns; follow-ups and other families are unmoved."""
    now = [100.0]
    for protect in (True, False):
        prefix = Prefix(protect_histories=protect)
        if prefix.follow_ups is not None:
            prefix.follow_ups = FollowUps(prefix.min_match_blocks, clock=lambda: now[0])
        a, b = backend("a"), backend("b", in_flight=1)  # b slightly busier: load alone would pick a
        z1 = chat(SYSTEM, "Do you ship to Norway and how long does it take? " * 3)
        prefix.claimed(b, z1)
        prefix.completed(b, z1, DONE)
        now[0] += 60  # z's user left long ago; b still holds the system prompt
        x1 = chat(SYSTEM, "My order 1234 has not arrived, where is it? " * 12)
        prefix.claimed(a, x1)
        prefix.completed(a, x1, DONE)  # x waits for its user on a
        new_chat = chat(SYSTEM, "Can I return a gift without the receipt? " * 3)
        assert prefix.select([a, b], new_chat) is (b if protect else a)
        x2 = chat(SYSTEM, "My order 1234 has not arrived, where is it? " * 12, "It left on Monday. " * 5, "Thanks!")
        assert prefix.select([a, b], x2) is a  # its history is on a
        other_family = chat("You translate English to French, word for word, nothing else. " * 8, "Hello there")
        assert prefix.select([a, b], other_family) is a  # nothing of its family waits anywhere: load decides


def test_follow_ups_track_running_and_waiting_chats_until_they_return_or_expire() -> None:
    now = [0.0]
    follow_ups = FollowUps(family_blocks=2, min_horizon=2.0, clock=lambda: now[0])
    family, other = b"f1", b"g1"
    x = [b"f0", family, b"x2", b"x3"]  # 4 blocks, family block f1
    follow_ups.started("a", x)
    assert follow_ups.at_risk("a", family, shared=2) == 2  # running: its 2 blocks past the shared 2
    follow_ups.finished("a", x)
    assert follow_ups.at_risk("a", family, shared=2) == 2 and follow_ups.at_risk("b", family, shared=2) == 0
    assert follow_ups.at_risk("a", other, shared=2) == 0
    x_next = [*x, b"x4", b"x5"]
    assert follow_ups.continues(x_next) == "a"
    now[0] = 0.5
    follow_ups.arrived(x_next)
    assert follow_ups.mean_gap == 0.5 and follow_ups.at_risk("a", family, shared=2) == 0
    follow_ups.started("b", x_next)
    follow_ups.finished("b", x_next)
    assert follow_ups.at_risk("b", family, shared=2) == 4
    now[0] = 10.0  # past the horizon (max(2 s, 3 x 0.5 s)): the chat ended
    assert follow_ups.at_risk("b", family, shared=2) == 0 and len(follow_ups) == 0


async def test_a_change_between_taking_the_waiter_and_awaiting_it_still_wakes_it() -> None:
    # The supervisor's readiness wait once lost this wake-up (the waiter was made in a task that had
    # not run yet), so an instance ready under load stayed "starting" until some later change.
    registry = Registry()
    change = registry.next_change()
    registry.notify_change()
    await asyncio.wait_for(change, timeout=1.0)
    cancelled = registry.next_change()
    other = registry.next_change()
    cancelled.cancel()
    registry.notify_change()
    await asyncio.wait_for(other, timeout=1.0)  # one waiter cancelled never cancels the others


async def test_a_queued_retry_does_not_block_the_waiters_behind_it_from_the_backend_it_failed_on() -> None:
    registry = Registry()
    failed = registry.add(backend("failed", slots=1))
    other = registry.add(backend("other", slots=1))
    dispatcher = Dispatcher(registry, LeastConnections())
    busy_failed, busy_other = occupy(registry, failed), occupy(registry, other)
    retry = asyncio.create_task(dispatcher.claim(facts(), excluded=[failed]))
    await wait_for(lambda: dispatcher.queue_depth == 1)
    fresh = asyncio.create_task(dispatcher.claim(facts()))
    await wait_for(lambda: dispatcher.queue_depth == 2)
    busy_failed.release()  # the retry may not use it; the request behind it may
    with await asyncio.wait_for(fresh, timeout=2) as claim:
        assert claim.backend is failed
    assert not retry.done()
    busy_other.release()
    with await asyncio.wait_for(retry, timeout=2) as claim:
        assert claim.backend is other


def test_a_removed_backend_is_forgotten_by_the_policy_prefix_index_and_sticky_pins_alike() -> None:
    registry = Registry()
    a, b = registry.add(backend("a")), registry.add(backend("b"))
    prefix = Prefix()
    sticky = Sticky(prefix, ttl=60)
    dispatcher = Dispatcher(registry, sticky)
    request = facts(conversation(1), headers={"X-Session-ID": "s1"})
    dispatcher.selector.claimed(a, request)
    prefix.completed(a, request, Usage(prompt_tokens=300, completion_tokens=4, cached_tokens=0))
    assert sticky.pinned(request) == "a" and prefix.remembers("a")
    registry.remove("a")
    assert sticky.pinned(request) is None and sticky.entries_count() == 0
    assert not prefix.remembers("a")
    assert b in registry.backends
