"""The bytes around a generation's tokens, per kind of request (docs/llama-server-api.md,
"POST /v1/chat/completions" and "POST /completion"): the SSE chunk of each token, the stream's tail
(finish chunk, usage chunk, `[DONE]`), and the body of a request that does not stream.

Built as byte templates once per request, so the per-token work is a concatenation. In plain-OpenAI
mode (`openai_only`) a stream that asked for usage carries `"usage":null` in every chunk before the last.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from llmbalancer.testing.fake_llama.jobs import Job, Kind
from llmbalancer.testing.fake_llama.wire import BUILD_INFO, DONE, dumps

NATIVE_CHUNK = (
    b'data: {"index":0,"content":%s,"tokens":[%d],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":%d,"tokens_evaluated":%d}\n\n'
)


@dataclass(frozen=True)
class Framing:
    """One request's templates: a token chunk is `pre + token_json + post` (native: `NATIVE_CHUNK`)."""

    kind: Kind
    created: int
    alias_json: bytes
    cid: str = ""
    envelope: bytes = b""
    chunk_envelope: bytes = b""
    pre: bytes = b""
    post: bytes = b""
    first_extra: bytes = b""  # sent before the first token's chunk (the chat role chunk)

    @classmethod
    def build(cls, kind: Kind, created: int, alias_json: bytes, *, usage_null: bool) -> Framing:
        """`usage_null`: a plain-OpenAI stream that asked for usage (`"usage":null` in each chunk)."""
        if kind == "chat":
            cid = "chatcmpl-" + secrets.token_hex(16)
            envelope = (
                b'],"created":%d,"id":"%s","model":%s,"system_fingerprint":"%s",'
                b'"object":"chat.completion.chunk"' % (created, cid.encode(), alias_json, BUILD_INFO.encode())
            )
            chunk_envelope = envelope + b',"usage":null' if usage_null else envelope
            return cls(
                kind, created, alias_json, cid, envelope, chunk_envelope,
                pre=b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":',
                post=b"}}" + chunk_envelope + b"}\n\n",
                first_extra=(
                    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
                    b'"content":null}}' + chunk_envelope + b"}\n\n"
                ),
            )
        if kind == "text":
            cid = "cmpl-" + secrets.token_hex(16)
            envelope = (
                b'],"created":%d,"model":%s,"system_fingerprint":"%s","object":"text_completion",'
                b'"id":"%s"' % (created, alias_json, BUILD_INFO.encode(), cid.encode())
            )
            chunk_envelope = envelope + b',"usage":null' if usage_null else envelope
            return cls(
                kind, created, alias_json, cid, envelope, chunk_envelope,
                pre=b'data: {"choices":[{"text":',
                post=b',"index":0,"logprobs":null,"finish_reason":null}' + chunk_envelope + b"}\n\n",
            )
        return cls(kind, created, alias_json)

    def openai_tail(self, finish: str, usage: bytes, with_timings: bytes, include_usage: bool) -> bytes:
        """The end of a chat or text stream: the finish chunk, the usage chunk if asked, `[DONE]`."""
        if self.kind == "chat":
            finish_choice = b'data: {"choices":[{"finish_reason":"%s","index":0,"delta":{}}' % finish.encode()
        else:
            finish_choice = (
                b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"%s"}' % finish.encode()
            )
        if include_usage:
            tail = finish_choice + self.chunk_envelope + b"}\n\n"
            tail += b'data: {"choices":[' + self.envelope + b',"usage":' + usage + with_timings + b"}\n\n"
        else:
            tail = finish_choice + self.envelope + with_timings + b"}\n\n"
        return tail + DONE

    def delta_chunk(self, delta: bytes) -> bytes:
        """A chat stream's chunk carrying ``delta`` (JSON) as is (a tool call's piece)."""
        head = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":'
        return head + delta + b"}" + self.chunk_envelope + b"}\n\n"

    def openai_body(
        self, finish: str, text: str, usage: bytes, with_timings: bytes, message: bytes | None = None
    ) -> bytes:
        """The whole answer of a chat or text request that did not stream (``message``: a chat's, as is)."""
        if self.kind == "chat":
            template = (
                b'{"choices":[{"finish_reason":"%s","index":0,"message":%s}],'
                b'"created":%d,"model":%s,"system_fingerprint":"%s","object":"chat.completion",'
                b'"usage":%s,"id":"%s"%s}'
            )
            said = message or b'{"role":"assistant","content":' + dumps(text) + b"}"
            choice: tuple[bytes, bytes] = (finish.encode(), said)
        else:
            template = (
                b'{"choices":[{"text":%s,"index":0,"logprobs":null,"finish_reason":"%s"}],'
                b'"created":%d,"model":%s,"system_fingerprint":"%s","object":"text_completion",'
                b'"usage":%s,"id":"%s"%s}'
            )
            choice = (dumps(text), finish.encode())
        rest = (self.created, self.alias_json, BUILD_INFO.encode(), usage, self.cid.encode(), with_timings)
        return template % (*choice, *rest)


def usage_json(generated: int, n_prompt: int, cache_n: int) -> bytes:
    return (
        b'{"completion_tokens":%d,"prompt_tokens":%d,"total_tokens":%d,'
        b'"prompt_tokens_details":{"cached_tokens":%d}}' % (generated, n_prompt, generated + n_prompt, cache_n)
    )


def native_final(
    job: Job, text: str, slot_id: int, alias: str, generated: int, finish: str, timings: bytes
) -> bytes:
    """The final object of `/completion`: the whole answer, or the last event of its stream."""
    body = {
        "index": 0,
        "content": "" if job.stream else text,
        "tokens": [],
        "id_slot": slot_id,
        "stop": True,
        "model": alias,
        "tokens_predicted": generated,
        "tokens_evaluated": len(job.tokens),
        "generation_settings": job.params,
        "prompt": job.prompt if isinstance(job.prompt, str) else json.dumps(job.prompt),
        "has_new_line": "\n" in text,
        "truncated": False,
        "stop_type": "eos" if finish == "stop" else "limit",
        "stopping_word": "",
        "tokens_cached": len(job.tokens) + max(generated - 1, 0),
    }
    return dumps(body)[:-1] + b',"timings":' + timings + b"}"
