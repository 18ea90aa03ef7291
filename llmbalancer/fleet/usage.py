"""Token counts read from the tail of a response, without parsing (or re-encoding) what passed through.

Where the counts are, in the last bytes of a response:
- llama.cpp streamed chat, no ``stream_options``: the finish chunk's ``timings`` (``cache_n`` reused
  prompt tokens, ``prompt_n`` evaluated ones, ``predicted_n`` generated); with ``include_usage``: a
  ``usage`` chunk before ``[DONE]``. Non-streamed: both ``usage`` and ``timings`` at the end.
- llama.cpp ``/completion``: ``tokens_cached``/``tokens_evaluated``/``tokens_predicted`` plus ``timings``.
- OpenAI-compatible servers: ``usage`` (``prompt_tokens``, ``completion_tokens``,
  ``prompt_tokens_details.cached_tokens``). A stream carries it only when asked for: for a plain
  OpenAI-compatible backend the proxy asks (``stream_options.include_usage``) when the client did not,
  and ``usage_chunk.UsageCut`` cuts that chunk from the client's stream and hands it here as the tail.
- Ollama: ``prompt_eval_count`` and ``eval_count`` in the final object.
- OpenAI's Responses API: ``usage`` with ``input_tokens`` (the whole prompt), ``output_tokens`` and
  ``input_tokens_details.cached_tokens``, at the end of the answer or of its ``response.completed`` event.
- Anthropic's Messages API: ``usage`` with ``input_tokens`` (the prompt tokens *not* read from the cache),
  ``cache_read_input_tokens``, ``cache_creation_input_tokens`` and ``output_tokens``. Streamed, the
  prompt's counts are in the first event (``message_start``) and only ``output_tokens`` in the last
  (``message_delta``): the proxy keeps the first chunk as well (``head``), read only when the tail lacks them.
The proxy keeps only the last two chunks it relayed and hands them here once, after the stream ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The last bytes of a response, as the proxy keeps them (an alias: ``Access.bytes`` shadows ``bytes``).
Tail = bytes

# Enough for a finish chunk with timings and a usage chunk.
TAIL_BYTES = 8192
# A relay keeps the body's last read joined to the reads before it until they make this many bytes, and the piece
# before: a llama.cpp finish chunk with its timings and a usage chunk take about 1.3 KB, and on a busy machine one
# write of the backend's can arrive in several reads (keeping just the last two reads lost them now and then).
TAIL_PIECE = 2048


def kept(previous: bytes, last: bytes, data: bytes) -> tuple[bytes, bytes]:
    """The tail a relay keeps after one more read ``data``: (the piece before, the last piece), each piece reads
    joined until it holds ``TAIL_PIECE`` bytes, so a finish chunk split over several reads is whole in the two."""
    return (last, data) if len(last) >= TAIL_PIECE else (previous, last + data)

_FIELDS = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)')
    for name in (
        "cache_n", "prompt_n", "predicted_n", "prompt_tokens", "completion_tokens", "cached_tokens",
        "prompt_eval_count", "eval_count", "input_tokens", "output_tokens", "cache_read_input_tokens",
        "cache_creation_input_tokens",
    )
}


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    # llama.cpp's timings.prompt_ms / prompt_n: seconds per prompt token evaluated (not cached), if reported.
    prompt_token_seconds: float | None = None
    # llama.cpp's timings.predicted_ms / predicted_n: seconds per generated token (decode speed), if reported.
    decode_token_seconds: float | None = None


_PROMPT_MS = re.compile(rb'"prompt_ms"\s*:\s*([0-9.eE+-]+)')
_PREDICTED_MS = re.compile(rb'"predicted_ms"\s*:\s*([0-9.eE+-]+)')


def _last(name: str, tail: bytes) -> int | None:
    matches = _FIELDS[name].findall(tail)
    return int(matches[-1]) if matches else None


def read_usage(tail: bytes, head: bytes = b"") -> Usage | None:
    """The counts found in the response's last bytes (and, for a streamed Anthropic message, its first
    ones), or None when it reported none."""
    tail = tail[-TAIL_BYTES:]
    if b'_n"' not in tail and b'tokens"' not in tail and b'count"' not in tail:
        return None
    prompt = _last("prompt_tokens", tail)
    completion = _last("completion_tokens", tail)
    cached = _last("cached_tokens", tail)
    cache_n = _last("cache_n", tail)
    per_token = per_decoded = None
    if cache_n is not None:
        # llama.cpp's timings: prompt_tokens = cache_n + prompt_n (and cached_tokens = cache_n).
        prompt_n = _last("prompt_n", tail)
        if prompt is None and prompt_n is not None:
            prompt = cache_n + prompt_n
        if completion is None:
            completion = _last("predicted_n", tail)
        if cached is None:
            cached = cache_n
        per_token = _per_token(_PROMPT_MS, tail, prompt_n)
        per_decoded = _per_token(_PREDICTED_MS, tail, _last("predicted_n", tail))
    if prompt is None:
        prompt = _last("prompt_eval_count", tail)
        if completion is None:
            completion = _last("eval_count", tail)
    if prompt is None and completion is None:
        prompt, completion, cached = _input_output(tail, head[:TAIL_BYTES])
    if prompt is None and completion is None:
        return None
    return Usage(prompt, completion, cached, per_token, per_decoded)


def _input_output(tail: bytes, head: bytes) -> tuple[int | None, int | None, int | None]:
    """(prompt, completion, cached) as the Responses and Messages APIs count them."""
    completion = _last("output_tokens", tail)
    source = tail if _last("input_tokens", tail) is not None else head
    prompt = _last("input_tokens", source)
    read = _last("cache_read_input_tokens", source)
    created = _last("cache_creation_input_tokens", source)
    if prompt is not None and (read is not None or created is not None):
        return prompt + (read or 0) + (created or 0), completion, read  # Anthropic's prompt leaves the cache out
    return prompt, completion, _last("cached_tokens", source)


def _per_token(field: re.Pattern[bytes], tail: bytes, count: int | None) -> float | None:
    """llama.cpp's ``*_ms`` timing over its token ``count``, in seconds per token."""
    found = field.findall(tail)
    if not found or not count:
        return None
    try:
        return float(found[-1]) / 1000 / count
    except ValueError:
        return None
