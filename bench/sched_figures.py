"""The scheduling benchmark's figures computed from what a run leaves: the client's request times and the fake
servers' timelines ((monotonic time, busy slots, deferred requests) at every change; ``time.monotonic`` is
system-wide, so the client's and the servers' times align), and the oracle hit ratio of a workload.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import fleet
import workload

from llmbalancer.testing.fake_llama import FakeLlamaConfig
from llmbalancer.testing.fake_llama.prepared import Prepared
from llmbalancer.testing.fake_llama.prompt import lcp, render_chat, tokenize

Timeline = list[list[float]]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def busy_share(timelines: list[Timeline], slots: list[int], start: float, end: float) -> float:
    """Share of the fleet's slot-seconds busy between ``start`` and ``end`` (the load actually carried)."""
    busy_s = 0.0
    for timeline in timelines:
        busy, last = 0, start
        for t, now_busy, _ in timeline:
            if t > start:
                busy_s += busy * (min(t, end) - last)
                last = min(t, end)
            busy = int(now_busy)
            if t >= end:
                break
        busy_s += busy * max(0.0, end - last)
    return busy_s / (sum(slots) * (end - start))


def misqueued_seconds(timelines: list[Timeline], slots: list[int]) -> tuple[float, float]:
    """(seconds deferred while another server had a free slot, total seconds deferred), summed over requests."""
    events = sorted((t, i, busy, deferred) for i, tl in enumerate(timelines) for t, busy, deferred in tl)
    busy_now = [0] * len(timelines)
    deferred_now = [0] * len(timelines)
    wasted = total = 0.0
    last_t = events[0][0] if events else 0.0
    for t, i, busy, deferred in events:
        dt = t - last_t
        if dt > 0:
            for a, waiting in enumerate(deferred_now):
                if waiting:
                    total += waiting * dt
                    if any(busy_now[b] < slots[b] for b in range(len(slots)) if b != a):
                        wasted += waiting * dt
        busy_now[i], deferred_now[i] = int(busy), int(deferred)
        last_t = t
    return wasted, total


def idle_while_waiting(
    timelines: list[Timeline], slots: list[int], requests: Iterable[tuple[float, float]], start: float, end: float
) -> float:
    """Share of the fleet's slot-seconds between ``start`` and ``end`` that were idle while a request waited.

    ``requests``: each request's (sent, ended) times at the client. A request is *waiting* while it is sent
    and not in a server's slot: in the balancer's queue, on its way, or deferred in a server's FIFO. With
    ``in_flight(t)`` requests sent and not ended and ``busy(t)`` busy slots, ``waiting(t) = in_flight(t) -
    busy(t)``, and ``min(idle slots, waiting)`` slots idle at ``t`` could have served one. Every target pays
    the same few milliseconds per request for the hops between the client, the proxy and the server.
    """
    events: list[tuple[float, int, int]] = []  # (time, server index or -1 for the client, new value or +-1)
    for index, timeline in enumerate(timelines):
        events += [(t, index, int(busy)) for t, busy, _ in timeline]
    for sent, ended in requests:
        events += [(sent, -1, 1), (ended, -1, -1)]
    events.sort()
    total = sum(slots)
    busy_now = [0] * len(timelines)
    busy_sum = in_flight = 0
    idle_s = 0.0
    last = start
    for t, who, value in events:
        if t > start:
            span = min(t, end) - max(last, start)
            if span > 0:
                idle_s += min(total - busy_sum, max(0, in_flight - busy_sum)) * span
            last = t
        if t >= end:
            break
        if who < 0:
            in_flight += value
        else:
            busy_sum += value - busy_now[who]
            busy_now[who] = value
    return idle_s / (total * (end - start))


def oracle_hit_ratio(plays: Sequence[Sequence[workload.Session]]) -> float:
    """The prompt-cache hit ratio if every turn went to the server holding its history (with room for all):
    a follow-up reuses its previous turn's prompt and reply, a first turn the longest prefix it shares with any
    earlier first turn (its system prompt, when another chat used it before), at most all but one token, as
    llama.cpp always evaluates one. Tokens as the fake counts them, replies as it writes them (``ignore_eos``)."""
    prep = Prepared.build(FakeLlamaConfig(alias=fleet.MODEL))
    cached = total = 0
    for sessions in plays:  # each seed on a fresh fleet
        firsts: list[tuple[str, ...]] = []
        for session in sorted(sessions, key=lambda s: s.start_s):
            messages = [{"role": "system", "content": session.system}]
            held: Sequence[str] | None = None
            for turn in session.turns:
                messages.append({"role": "user", "content": turn.user})
                tokens = tuple(tokenize(render_chat(messages)))
                if held is None:
                    best = max((lcp(first, tokens) for first in firsts), default=0)
                    firsts.append(tokens)
                else:
                    best = lcp(held, tokens)
                cached += min(best, len(tokens) - 1)
                total += len(tokens)
                held = (*tokens, *prep.cached_reply(turn.max_tokens))
                messages.append({"role": "assistant", "content": prep.text(turn.max_tokens)})
    return cached / total if total else float("nan")
