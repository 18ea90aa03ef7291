"""Ollama requests as the backend's requests: a ``Plan`` says what to send where and what answer to expect.

- ``/api/chat`` -> ``/v1/chat/completions``.
- ``/api/generate`` -> ``/v1/chat/completions`` with the prompt as the user's message (and ``system`` as the
  system message): Ollama applies the model's chat template to a prompt, and so does the backend to
  chat messages. ``raw: true`` -> ``/v1/completions``, the prompt as written. ``suffix`` (fill in the
  middle) -> llama.cpp's ``/infill``, or ``/v1/completions`` with ``suffix`` on other servers (llama.cpp's
  ``/v1/completions`` ignores ``suffix``). ``template`` and ``context`` have no equivalent: refused.
- ``/api/embed`` and ``/api/embeddings`` -> ``/v1/embeddings``.
- ``/api/show`` -> ``/v1/models`` (and llama.cpp's ``/props``), described by ``catalog``.
- A chat without messages or a generate without a prompt is Ollama's "load the model": the backend is
  asked for ``/v1/models`` (it is up and serves the model) and the answer is ``done_reason: load``.

Ollama streams unless ``"stream": false``. A stream to a plain OpenAI-compatible server asks for the usage
chunk (``stream_options.include_usage``), the only place it reports token counts; llama.cpp's finish chunk
carries ``timings`` unasked. ``keep_alive`` (and the context-handling ``truncate``/``shift``) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from llmbalancer.translate.kinds import Family
from llmbalancer.translate.messages import invalid, openai_messages, user_content
from llmbalancer.translate.options import sampling_params, unsupported

log = structlog.get_logger("llmbalancer.translate")

Upstream = Literal["chat", "text", "infill", "embed", "load", "show"]
Shape = Literal["chat", "generate", "embed", "embeddings", "show"]

_IGNORED = frozenset({"model", "stream", "keep_alive", "truncate", "shift", "options"})


@dataclass(frozen=True, slots=True)
class Plan:
    """One translated request: ``upstream`` is the kind of answer the backend gives, ``shape`` Ollama's."""

    method: str
    path: str
    body: dict[str, Any] | None
    streamed: bool
    upstream: Upstream
    shape: Shape
    load_reason: str = "load"
    model: str | None = None  # /api/show's model, as the backend names it


def _model(parsed: Mapping[str, Any]) -> str:
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required")  # Ollama's words
    return model


def _streamed(parsed: Mapping[str, Any]) -> bool:
    return parsed.get("stream") is not False  # Ollama streams unless told not to


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, Mapping):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": dict(value)}}
    raise invalid('format must be "json" or a JSON schema object')


def _think(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"chat_template_kwargs": {"enable_thinking": value}}
    if value in ("high", "medium", "low"):
        return {"reasoning_effort": value}
    raise invalid('think must be true, false, "high", "medium" or "low"')


def _logprobs(parsed: Mapping[str, Any]) -> dict[str, Any]:
    if not parsed.get("logprobs"):
        return {}
    extra: dict[str, Any] = {"logprobs": True}
    if isinstance(parsed.get("top_logprobs"), int) and parsed["top_logprobs"] > 0:
        extra["top_logprobs"] = parsed["top_logprobs"]
    return extra


def _load(parsed: Mapping[str, Any], shape: Shape) -> Plan:
    reason = "unload" if parsed.get("keep_alive") in (0, "0", "0s", "0m") else "load"
    return Plan("GET", "/v1/models", None, False, "load", shape, reason)


def _generation(
    parsed: Mapping[str, Any], family: Family, backend: str, path: str, upstream: Upstream, shape: Shape, **fields: Any
) -> Plan:
    streamed = _streamed(parsed)
    body: dict[str, Any] = {"model": _model(parsed), **fields, "stream": streamed}
    body.update(sampling_params(parsed.get("options"), family, backend))
    if (response_format := _response_format(parsed.get("format"))) is not None:
        body["response_format"] = response_format
    if streamed and family == "openai":
        body["stream_options"] = {"include_usage": True}
    return Plan("POST", path, body, streamed, upstream, shape)


def chat(parsed: Mapping[str, Any], family: Family, backend: str) -> Plan:
    _model(parsed)
    messages = parsed.get("messages")
    if not messages:
        return _load(parsed, "chat")
    plan = _generation(
        parsed, family, backend, "/v1/chat/completions", "chat", "chat",
        messages=openai_messages(messages), **_think(parsed.get("think")), **_logprobs(parsed),
    )
    if parsed.get("tools"):
        assert plan.body is not None
        plan.body["tools"] = parsed["tools"]  # Ollama's tools are OpenAI's function tools already
    _note_ignored(parsed, {"messages", "tools", "format", "think", "logprobs", "top_logprobs"})
    return plan


def generate(parsed: Mapping[str, Any], family: Family, backend: str) -> Plan:
    _model(parsed)
    prompt = parsed.get("prompt") or ""
    suffix = parsed.get("suffix") or ""
    if not isinstance(prompt, str) or not isinstance(suffix, str):
        raise invalid("prompt and suffix must be strings")
    if parsed.get("template"):
        raise unsupported("template (a prompt template of Ollama's own)", backend, family)
    if parsed.get("context"):
        raise unsupported("context (token ids of an earlier answer)", backend, family)
    images = parsed.get("images")
    if not prompt and not suffix and not images:
        return _load(parsed, "generate")
    _note_ignored(parsed, {"prompt", "suffix", "images", "system", "template", "context", "raw", "format", "think",
                           "logprobs", "top_logprobs"})
    if not suffix and not parsed.get("raw"):
        messages: list[dict[str, Any]] = []
        if isinstance(parsed.get("system"), str) and parsed["system"]:
            messages.append({"role": "system", "content": parsed["system"]})
        messages.append({"role": "user", "content": user_content(prompt, images)})
        return _generation(
            parsed, family, backend, "/v1/chat/completions", "chat", "generate",
            messages=messages, **_think(parsed.get("think")), **_logprobs(parsed),
        )
    for name in ("images", "think", "logprobs"):
        if parsed.get(name):
            raise unsupported(f"{name} with a raw prompt or a suffix", backend, family)
    if not suffix:
        return _generation(parsed, family, backend, "/v1/completions", "text", "generate", prompt=prompt)
    if family == "openai":
        return _generation(
            parsed, family, backend, "/v1/completions", "text", "generate", prompt=prompt, suffix=suffix
        )
    plan = _generation(
        parsed, family, backend, "/infill", "infill", "generate", input_prefix=prompt, input_suffix=suffix
    )
    assert plan.body is not None
    if "max_tokens" in plan.body:
        plan.body["n_predict"] = plan.body.pop("max_tokens")  # llama.cpp's native name
    return plan


def embed(parsed: Mapping[str, Any], shape: Shape) -> Plan:
    """``/api/embed`` (``input``: text or texts) and the older ``/api/embeddings`` (``prompt``: one text)."""
    text = parsed.get("input") if shape == "embed" else parsed.get("prompt")
    if not isinstance(text, str) and not (isinstance(text, list) and all(isinstance(t, str) for t in text)):
        raise invalid("input must be a string or a list of strings" if shape == "embed" else "prompt must be a string")
    body: dict[str, Any] = {"model": _model(parsed), "input": text, "encoding_format": "float"}
    if isinstance(parsed.get("dimensions"), int):
        body["dimensions"] = parsed["dimensions"]
    if parsed.get("options"):
        log.debug("ollama_option_ignored", option="options", reason="embeddings take no sampling options")
    return Plan("POST", "/v1/embeddings", body, False, "embed", shape)


def show(parsed: Mapping[str, Any]) -> Plan:
    """``/api/show``: the backend's model list (and, for llama.cpp, its ``/props``, asked by the relay)."""
    model = parsed.get("model") or parsed.get("name")
    return Plan("GET", "/v1/models", None, False, "show", "show", model=model if isinstance(model, str) else None)


def _note_ignored(parsed: Mapping[str, Any], used: set[str]) -> None:
    ignored = [key for key in parsed if key not in used and key not in _IGNORED]
    if ignored:
        log.debug("ollama_fields_ignored", fields=ignored)
    if "keep_alive" in parsed:
        log.debug("ollama_option_ignored", option="keep_alive", reason="the backend keeps its model loaded")
