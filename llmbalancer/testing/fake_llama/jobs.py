"""What a generation request asks for: its JSON body parsed as llama-server parses it (and failing as it
fails: docs/llama-server-api.md, "POST /v1/chat/completions", errors), turned into a `Job`.

Three kinds: `chat` (`/v1/chat/completions`), `native` (`/completion`) and `text` (OpenAI
`/v1/completions`, not probed on the real server; shaped like its chat sibling). The token limit is
`max_tokens` / `max_completion_tokens` / `n_predict` (-1: the config's default); `ignore_eos: true`
repeats the reply up to the limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from llmbalancer.testing.fake_llama.prepared import default_params
from llmbalancer.testing.fake_llama.prompt import render_chat, tokenize
from llmbalancer.testing.fake_llama.tools import ToolCall
from llmbalancer.testing.fake_llama.wire import api_error

Kind = Literal["chat", "native", "text"]

_PARAM_KEYS = (
    "seed",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "stream",
    "n_probs",
    "stop",
)


@dataclass
class Job:
    """One generation request as parsed: its prompt as tokens, the limit, how to answer."""

    kind: Kind
    stream: bool
    include_usage: bool
    tokens: tuple[str, ...]
    limit: int
    ignore_eos: bool
    params: dict[str, Any]
    prompt: Any = None
    tool_call: ToolCall | None = None  # the answer is this call, not the reply (tools.py)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; a 500 worded as llama.cpp's JSON library words it otherwise."""
    raw = await request.read()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise api_error(500, f"[json.exception.parse_error.101] parse error: {exc}", "server_error") from None
    except json.JSONDecodeError as exc:
        if not raw.strip():
            detail = (
                "attempting to parse an empty input; check that your input string or stream "
                "contains the expected JSON"
            )
        else:
            last = exc.doc[max(0, exc.pos - 8) : exc.pos + 1]
            detail = f"syntax error while parsing value - invalid literal; last read: '{last}'"
        message = f"[json.exception.parse_error.101] parse error at line {exc.lineno}, column {exc.colno}: {detail}"
        raise api_error(500, message, "server_error") from None
    if not isinstance(data, dict):
        raise api_error(500, "[json.exception.type_error.302] type must be object", "server_error")
    return data


def _limit(data: Mapping[str, Any], keys: Sequence[str]) -> int:
    for key in keys:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return -1


def _params(data: Mapping[str, Any], limit: int, stream: bool) -> dict[str, Any]:
    params = default_params()
    for key in _PARAM_KEYS:
        if key in data:
            params[key] = data[key]
    params["n_predict"] = limit
    params["stream"] = stream
    return params


def _include_usage(data: Mapping[str, Any], stream: bool) -> bool:
    options = data.get("stream_options")
    return stream and isinstance(options, dict) and bool(options.get("include_usage"))


def chat_job(data: Mapping[str, Any]) -> Job:
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise api_error(400, "'messages' is required", "invalid_request_error")
    stream = bool(data.get("stream", False))
    limit = _limit(data, ("max_completion_tokens", "max_tokens", "n_predict"))
    return Job(
        kind="chat",
        stream=stream,
        include_usage=_include_usage(data, stream),
        tokens=tuple(tokenize(render_chat(messages))),
        limit=limit,
        ignore_eos=bool(data.get("ignore_eos", False)),
        params=_params(data, limit, stream),
    )


def _native_tokens(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return tokenize(prompt)
    if isinstance(prompt, list):  # token ids and/or strings
        tokens: list[str] = []
        for part in prompt:
            if isinstance(part, int):
                tokens.append(str(part))
            else:
                tokens.extend(tokenize(str(part)))
        return tokens
    return tokenize(str(prompt))


def native_job(data: Mapping[str, Any]) -> Job:
    prompt = data.get("prompt")
    if prompt is None:
        raise api_error(400, '"prompt" must be provided', "invalid_request_error")
    stream = bool(data.get("stream", False))
    limit = _limit(data, ("n_predict", "max_tokens"))
    return Job(
        kind="native",
        stream=stream,
        include_usage=False,
        tokens=tuple(_native_tokens(prompt)),
        limit=limit,
        ignore_eos=bool(data.get("ignore_eos", False)),
        params=_params(data, limit, stream),
        prompt=prompt,
    )


def text_job(data: Mapping[str, Any]) -> Job:
    prompt = data.get("prompt")
    if prompt is None:
        raise api_error(400, '"prompt" must be provided', "invalid_request_error")
    stream = bool(data.get("stream", False))
    limit = _limit(data, ("max_tokens", "n_predict"))
    return Job(
        kind="text",
        stream=stream,
        include_usage=_include_usage(data, stream),
        tokens=tuple(tokenize(prompt if isinstance(prompt, str) else json.dumps(prompt))),
        limit=limit,
        ignore_eos=bool(data.get("ignore_eos", False)),
        params=_params(data, limit, stream),
        prompt=prompt,
    )
