"""Tool calls, as llama-server makes them for a model whose chat template supports tools.

The fake's model "decides" simply: a chat request offering ``tools`` whose last message is the user's
is answered with a call of the first tool, its arguments the configured ``tool_arguments`` (JSON text);
once the conversation holds the tool's result (a ``tool`` message last), it answers with its reply.
On the wire as llama-server writes it: streamed, the role chunk, then a chunk opening the call (``index``,
``id``, ``type``, ``function.name``, empty ``arguments``), then the arguments in pieces, one per token,
and the finish chunk with ``finish_reason: "tool_calls"``; not streamed, a message whose ``content`` is
null and whose ``tool_calls`` carry the arguments as JSON text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmbalancer.testing.fake_llama.wire import dumps

_PIECE = re.compile(r"\s*\S+")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    ident: str

    def pieces(self) -> list[str]:
        """The arguments as generated, one piece per token."""
        return _PIECE.findall(self.arguments) or [self.arguments]

    def stream_deltas(self) -> list[bytes]:
        """Each streamed chunk's ``delta`` (JSON), one per token: the call's opening, then its arguments."""
        opening = {"tool_calls": [{"index": 0, "id": self.ident, "type": "function",
                                   "function": {"name": self.name, "arguments": ""}}]}
        rest = [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in self.pieces()]
        return [dumps(delta) for delta in (opening, *rest)]

    def message(self) -> bytes:
        """The non-streamed answer's ``message``."""
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}, "id": self.ident}
        return dumps({"role": "assistant", "content": None, "tool_calls": [call]})


def requested_call(data: Mapping[str, Any], arguments: str) -> ToolCall | None:
    """The call the fake makes for this chat request, or None when it answers with text."""
    tools, messages = data.get("tools"), data.get("messages")
    if not isinstance(tools, list) or not tools or not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "user":
        return None
    function = tools[0].get("function") if isinstance(tools[0], Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        return None
    return ToolCall(name, arguments, secrets.token_urlsafe(24)[:32])
