"""What the model sees: the fake's approximate tokenizer and the SmolLM2 chat template.

A prompt is approximated as tokens by splitting on whitespace, with chat-template special tokens
(`<|im_start|>`, ...) counted as one token each. Chat requests are rendered with the SmolLM2 chat
template, including its default system prompt when the request has none (docs/llama-server-api.md,
"POST /v1/chat/completions").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from llmbalancer.testing.fake_llama.wire import api_error

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_TOKEN_RE = re.compile(r"<\|[^|\s]*\|>|(?:(?!<\|)\S)+")
_REPLY_TOKEN_RE = re.compile(r"\s*\S+")


def tokenize(text: str) -> list[str]:
    """The fake's approximate tokenizer: whitespace-separated words, `<|special|>` tokens apart."""
    return _TOKEN_RE.findall(text)


def reply_tokens(reply: str) -> tuple[str, ...]:
    """The configured reply as generated: one token per word, each with its leading whitespace."""
    return tuple(_REPLY_TOKEN_RE.findall(reply))


def lcp(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def render_chat(messages: list[Any]) -> str:
    """The chat template applied to `messages`, ending with the assistant's turn (500, as llama.cpp's JSON
    library answers, when a message is not an object)."""
    parts: list[str] = []
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    for message in messages:
        if not isinstance(message, dict):
            raise api_error(500, "[json.exception.type_error.302] type must be object", "server_error")
        parts.append(f"<|im_start|>{message.get('role', 'user')}\n{_content_text(message.get('content'))}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)
