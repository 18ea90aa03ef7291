"""Ollama chat messages as OpenAI chat messages: images as ``image_url`` content parts (data URLs), tool
calls with their arguments as JSON text and an id, tool results tied to the call they answer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llmbalancer.errors import ProxyError

# The start of a base64-encoded image, by format: Ollama sends images as bare base64, OpenAI wants a data URL.
_IMAGE_PREFIXES = (
    ("iVBORw0KGgo", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp")
)


def invalid(message: str) -> ProxyError:
    return ProxyError(400, message, "invalid_request_error", "invalid_request")


def image_part(image: Any) -> dict[str, Any]:
    if not isinstance(image, str) or not image:
        raise invalid("images must be base64-encoded strings")
    if image.startswith(("data:", "http://", "https://")):
        url = image
    else:
        mime = next((kind for prefix, kind in _IMAGE_PREFIXES if image.startswith(prefix)), "image/png")
        url = f"data:{mime};base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def user_content(text: str, images: Any) -> str | list[dict[str, Any]]:
    """``text`` alone, or with ``images`` as OpenAI content parts."""
    if not images:
        return text
    if not isinstance(images, Sequence) or isinstance(images, str):
        raise invalid("images must be a list")
    return [{"type": "text", "text": text}, *(image_part(image) for image in images)]


def _tool_calls(calls: Any, turn: int) -> list[dict[str, Any]]:
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise invalid("tool_calls must be a list")
    converted = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise invalid("each tool call needs a function with a name")
        arguments = function.get("arguments", {})
        ident = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else f"call_{turn}_{index}"
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        converted.append({"id": ident, "type": "function", "function": {"name": function["name"], "arguments": text}})
    return converted


def openai_messages(messages: Any) -> list[dict[str, Any]]:
    """The conversation in OpenAI's shape. Ollama's tool results name the tool (``tool_name``) where OpenAI
    names the call (``tool_call_id``): each is tied to the first unanswered call of that tool in the last
    assistant turn, else to its first unanswered call."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise invalid("messages must be a list")
    converted: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, tool name) of the last assistant turn's calls
    for turn, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise invalid("each message needs a role")
        role = message["role"]
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise invalid("message content must be a string")
        out: dict[str, Any] = {"role": role, "content": user_content(content, message.get("images"))}
        if role == "assistant":
            if message.get("tool_calls"):
                calls = _tool_calls(message["tool_calls"], turn)
                out["tool_calls"] = calls
                unanswered = [(call["id"], call["function"]["name"]) for call in calls]
            if isinstance(message.get("thinking"), str) and message["thinking"]:
                out["reasoning_content"] = message["thinking"]  # llama.cpp's name; templates that keep it use it
        elif role == "tool":
            ident = message.get("tool_call_id")
            if not isinstance(ident, str) or not ident:
                name = message.get("tool_name") or message.get("name")
                match = next((call for call in unanswered if call[1] == name), unanswered[0] if unanswered else None)
                if match is not None:
                    unanswered.remove(match)
                    ident = match[0]
            if isinstance(ident, str):
                out["tool_call_id"] = ident
        converted.append(out)
    return converted
