"""The speed model: how long prefill and each token take, and the `timings` object that reports it.

`prefill_per_token` seconds per uncached prompt token before the first token, then
`token_delay * (1 + batch_slowdown * (busy_slots - 1))` seconds between tokens: decoding slows as more
slots share the batch (0, the default, is no slowdown). Waits notice a client that went away.
The `timings` fields are those of docs/llama-server-api.md ("POST /v1/chat/completions").
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from llmbalancer.testing.fake_llama.config import FakeLlamaConfig
from llmbalancer.testing.fake_llama.wire import check_alive, dumps


def prefill_seconds(config: FakeLlamaConfig, prompt_n: int) -> float:
    """How long evaluating `prompt_n` uncached prompt tokens takes."""
    return prompt_n * config.prefill_per_token


def token_gap(token_delay: float, batch_slowdown: float, busy: int) -> float:
    """The pause before the next token while `busy` slots share the batch."""
    return token_delay * (1.0 + batch_slowdown * (busy - 1))


async def pause(request: web.BaseRequest, seconds: float) -> None:
    """Sleep, noticing a client that went away even without aiohttp's handler cancellation."""
    if seconds <= 0:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, 0.05))
        check_alive(request)


def timings_json(cache_n: int, prompt_n: int, prompt_s: float, predicted_n: int, predicted_s: float) -> bytes:
    """llama-server's `timings` object of a finished request."""
    prompt_ms = prompt_s * 1e3
    predicted_ms = predicted_s * 1e3
    return dumps(
        {
            "cache_n": cache_n,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1e3 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
        }
    )
