"""The backend's answers as Ollama's: one NDJSON object per streamed event, the final ``done: true`` object,
or one object for a whole answer.

Counts and durations, on the final object: from llama.cpp's ``timings`` when the backend sent them
(``prompt_eval_count`` = ``prompt_n``, the prompt tokens evaluated, as Ollama counts them: a prefix
reused from the cache is not evaluated again; ``eval_count`` = ``predicted_n``; the durations from
``prompt_ms`` and ``predicted_ms``), else from OpenAI's ``usage`` (prompt tokens less cached ones,
completion tokens; no durations, which ``usage`` does not carry). ``total_duration`` is the balancer's
own, from the request's arrival to its last byte. Unknown figures are left out, never made up.
Tool calls arrive from OpenAI servers in pieces (their arguments as JSON text, in fragments); they are
gathered and sent as one Ollama object, arguments parsed, when the backend says why it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from llmbalancer.translate.requests import Plan

_DONE_REASONS = {"tool_calls": "stop", "function_call": "stop", "content_filter": "stop", "eos": "stop",
                 "word": "stop", "limit": "length"}


class BackendAnswerError(Exception):
    """The backend's answer cannot be told in Ollama's shape (or is an error event): its message."""


def line(obj: Mapping[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(ms: Any) -> int | None:
    return int(ms * 1_000_000) if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0 else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def counts(usage: Any, timings: Any) -> dict[str, int]:
    """Ollama's token counts and durations from llama.cpp's ``timings``, else OpenAI's ``usage``."""
    found: dict[str, int | None] = {}
    if isinstance(timings, Mapping) and _int(timings.get("predicted_n")) is not None:
        found = {
            "prompt_eval_count": _int(timings.get("prompt_n")),
            "prompt_eval_duration": _ns(timings.get("prompt_ms")),
            "eval_count": _int(timings.get("predicted_n")),
            "eval_duration": _ns(timings.get("predicted_ms")),
        }
    elif isinstance(usage, Mapping):
        prompt = _int(usage.get("prompt_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else None
        if prompt is not None and cached is not None:
            prompt = max(0, prompt - cached)
        found = {"prompt_eval_count": prompt, "eval_count": _int(usage.get("completion_tokens"))}
    return {key: value for key, value in found.items() if value is not None}


def _logprobs(choice: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if not isinstance(content, list):
        return None
    return [
        {
            "token": item.get("token"), "logprob": item.get("logprob"),
            "top_logprobs": [{"token": t.get("token"), "logprob": t.get("logprob")}
                             for t in item.get("top_logprobs") or () if isinstance(t, Mapping)],
        }
        for item in content if isinstance(item, Mapping)
    ]


def _error_message(event: Mapping[str, Any]) -> str | None:
    error = event.get("error")
    if error is None:
        return None
    if isinstance(error, Mapping):
        return str(error.get("message") or error)
    return str(error)


class OllamaAnswer:
    """One request's answer being told in Ollama's shape (``plan.shape``) from the backend's (``plan.upstream``)."""

    def __init__(self, plan: Plan, model: str, started: float) -> None:
        self._plan = plan
        self._model = model
        self._started = started  # monotonic, the request's arrival
        self._calls: dict[int, dict[str, str]] = {}
        self.finish: str | None = None
        self.usage: Any = None
        self.timings: Any = None

    # --- pieces

    def _object(
        self, text: str, thinking: Any = None, *, calls: list[dict[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self._model, "created_at": _now()}
        thinking = thinking if isinstance(thinking, str) and thinking else None
        if self._plan.shape == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            obj["message"] = message
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
        obj["done"] = False
        if extra:
            obj.update(extra)
        return obj

    def event(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The Ollama objects one streamed event becomes (often one, a role-only event none)."""
        message = _error_message(event)
        if message is not None:
            raise BackendAnswerError(message)
        if "timings" in event:
            self.timings = event["timings"]
        if event.get("usage"):
            self.usage = event["usage"]
        upstream = self._plan.upstream
        if upstream == "infill":
            if event.get("stop") is True:
                self.finish = str(event.get("stop_type") or "stop")
            text = event.get("content")
            return [self._object(text)] if isinstance(text, str) and text else []
        choices = event.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else None
        if choice is None:
            return []
        out: list[dict[str, Any]] = []
        if upstream == "text":
            text = choice.get("text")
            if isinstance(text, str) and text:
                out.append(self._object(text))
        else:
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                text, thinking = delta.get("content"), delta.get("reasoning_content")
                text = text if isinstance(text, str) else ""
                if text or (isinstance(thinking, str) and thinking):
                    extra = {"logprobs": lp} if (lp := _logprobs(choice)) is not None else {}
                    out.append(self._object(text, thinking, extra=extra))
                self._gather_calls(delta.get("tool_calls"))
        if choice.get("finish_reason"):
            self.finish = str(choice["finish_reason"])
            if self._calls:
                out.append(self._object("", calls=self._take_calls()))
        return out

    def _gather_calls(self, deltas: Any) -> None:
        for delta in deltas if isinstance(deltas, list) else ():
            if not isinstance(delta, Mapping):
                continue
            index = delta["index"] if isinstance(delta.get("index"), int) else len(self._calls)
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(delta.get("id"), str):
                call["id"] = delta["id"]
            function = delta.get("function")
            if isinstance(function, Mapping):
                call["name"] += function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""

    def _take_calls(self) -> list[dict[str, Any]]:
        calls = [self._calls[i] for i in sorted(self._calls)]
        self._calls = {}
        return [self._tool_call(c["id"], c["name"], c["arguments"], index) for index, c in enumerate(calls)]

    @staticmethod
    def _tool_call(ident: str, name: str, arguments: Any, index: int) -> dict[str, Any]:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            raise BackendAnswerError(f"the backend called tool {name!r} with arguments that are not a JSON object")
        call: dict[str, Any] = {"function": {"index": index, "name": name, "arguments": arguments}}
        if ident:
            call["id"] = ident
        return call

    def final(self) -> dict[str, Any]:
        """The ``done: true`` object that ends a stream (tool calls still gathered go out before it)."""
        reason = _DONE_REASONS.get(self.finish or "stop", self.finish or "stop")
        return self._object("", extra={"done": True, "done_reason": reason, **self._totals()})

    def pending_calls(self) -> list[dict[str, Any]]:
        return [self._object("", calls=self._take_calls())] if self._calls else []

    def _totals(self) -> dict[str, int]:
        return {"total_duration": int((time.monotonic() - self._started) * 1e9), **counts(self.usage, self.timings)}

    def usage_tail(self) -> bytes:
        """The counts as the access record's usage reader reads them (fleet/usage.py)."""
        return orjson.dumps({"usage": self.usage, "timings": self.timings})

    # --- whole answers

    def whole(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A whole (not streamed) answer as one Ollama object."""
        message = _error_message(body)
        if message is not None:
            raise BackendAnswerError(message)
        self.usage, self.timings = body.get("usage"), body.get("timings")
        if self._plan.upstream == "infill":
            self.finish = str(body.get("stop_type") or "stop")
            text = body.get("content")
            return {**self._object(text if isinstance(text, str) else ""), **self._ended()}
        choices = body.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        choice: Mapping[str, Any] = first if isinstance(first, Mapping) else {}
        self.finish = str(choice.get("finish_reason") or "stop")
        if self._plan.upstream == "text":
            text = choice.get("text")
            return {**self._object(text if isinstance(text, str) else ""), **self._ended()}
        message = choice.get("message")
        said: Mapping[str, Any] = message if isinstance(message, Mapping) else {}
        listed = said.get("tool_calls")
        calls = [
            self._tool_call(str(c.get("id") or ""), str(f.get("name") or ""), f.get("arguments"), i)
            for i, c in enumerate(listed if isinstance(listed, list) else ())
            if isinstance(c, Mapping) and isinstance(f := c.get("function"), Mapping)
        ]
        extra = {"logprobs": lp} if (lp := _logprobs(choice)) is not None else {}
        text = said.get("content")
        text = text if isinstance(text, str) else ""
        obj = self._object(text, said.get("reasoning_content"), calls=calls, extra=extra)
        return {**obj, **self._ended()}

    def _ended(self) -> dict[str, Any]:
        reason = _DONE_REASONS.get(self.finish or "stop", self.finish or "stop")
        return {"done": True, "done_reason": reason, **self._totals()}

    def loaded(self) -> dict[str, Any]:
        return self._object("", extra={"done": True, "done_reason": self._plan.load_reason})

    def embedded(self, body: Mapping[str, Any]) -> dict[str, Any]:
        message = _error_message(body)
        if message is not None:
            raise BackendAnswerError(message)
        data = body.get("data")
        if not isinstance(data, list):
            raise BackendAnswerError("the backend's embeddings answer has no data list")
        ordered = sorted((d for d in data if isinstance(d, Mapping)), key=lambda d: d.get("index", 0))
        vectors = [d.get("embedding") for d in ordered]
        self.usage = body.get("usage")
        if self._plan.shape == "embeddings":
            return {"embedding": vectors[0] if vectors else []}
        return {"model": self._model, "embeddings": vectors, **self._totals()}
