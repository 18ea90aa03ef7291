"""A seeded multi-turn chat workload: shared system prompts, growing histories, Poisson session arrivals.

Sessions arrive as a Poisson process. Each picks one of a few shared system prompts (skewed: the first
is the most common, as with one main product prompt), then runs several turns: a user message, a
streamed reply of a fixed length (``ignore_eos``), a think time, the next user message appended to the
whole history so far. Word counts stand for tokens (the fake tokenizes on whitespace); they are scaled
down from real chats (system prompts of thousands of tokens, replies of hundreds) so that a run takes
about a minute, keeping the ratios that matter: shared prefix >> new message, reply cost >> new prefill.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    system_prompts: int = 4
    system_words: tuple[int, int] = (300, 700)
    turns: tuple[int, int] = (2, 6)
    user_words: tuple[int, int] = (20, 100)
    reply_tokens: tuple[int, int] = (24, 72)
    think_mean_s: float = 1.0


@dataclass(frozen=True)
class Turn:
    user: str
    max_tokens: int
    think_s: float  # pause after this turn's reply before the next turn


@dataclass(frozen=True)
class Session:
    id: str
    start_s: float  # offset from the run's start
    system: str
    turns: tuple[Turn, ...]


_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vor", "ne", "pi", "dal", "qu", "ix", "ber", "mo", "zen", "ta")


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def system_prompts(shape: Shape, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"You are assistant number {i}. " + _words(rng, rng.randint(*shape.system_words))
            for i in range(shape.system_prompts)]


def sessions(shape: Shape, seed: int, session_rate: float, window_s: float) -> list[Session]:
    """Sessions whose first turn arrives within ``window_s`` seconds, at ``session_rate`` per second."""
    rng = random.Random(seed + 1)
    prompts = system_prompts(shape, seed)
    weights = [1.0 / (i + 1) for i in range(len(prompts))]
    out: list[Session] = []
    t = rng.expovariate(session_rate)
    while t < window_s:
        turns = tuple(
            Turn(
                user=_words(rng, rng.randint(*shape.user_words)),
                max_tokens=rng.randint(*shape.reply_tokens),
                think_s=rng.expovariate(1.0 / shape.think_mean_s),
            )
            for _ in range(rng.randint(*shape.turns))
        )
        out.append(Session(f"chat-{len(out)}", t, rng.choices(prompts, weights)[0], turns))
        t += rng.expovariate(session_rate)
    return out


def mean_turns(shape: Shape) -> float:
    return (shape.turns[0] + shape.turns[1]) / 2


def request_work_s(shape: Shape, token_delay: float, prefill_per_token: float, batch_slowdown: float,
                   slots: int) -> float:
    """Mean slot-seconds one request takes on a server whose slots are all busy, with ideal cache reuse.

    Ideal reuse: the shared system prompt and the history are cached, so only the new user message (plus
    a few template tokens) is prefilled; decode runs at the full-batch step. This is what a scheduler
    that keeps every conversation on its server can reach, so the load levels are fractions of it.
    """
    uncached = (shape.user_words[0] + shape.user_words[1]) / 2 + 8
    decode_steps = (shape.reply_tokens[0] + shape.reply_tokens[1]) / 2 - 1
    return uncached * prefill_per_token + decode_steps * token_delay * (1 + batch_slowdown * (slots - 1))
