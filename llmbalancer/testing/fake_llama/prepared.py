"""What is fixed for one config, computed once: the reply as tokens and as JSON, and the bodies of
`/v1/models` and `/props` (shapes in docs/llama-server-api.md, "GET /props, GET /v1/models").

The reply is `FakeLlamaConfig.reply`, one token per word (with its leading space).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llmbalancer.testing.fake_llama.config import FakeLlamaConfig
from llmbalancer.testing.fake_llama.prompt import CHAT_TEMPLATE, reply_tokens
from llmbalancer.testing.fake_llama.wire import BUILD_INFO, dumps


def default_params() -> dict[str, Any]:
    """A subset of the real `default_generation_settings.params` keys."""
    return {
        "n_predict": -1,
        "seed": 4294967295,
        "temperature": 0.8,
        "dynatemp_range": 0.0,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "n_keep": 0,
        "n_discard": 0,
        "ignore_eos": False,
        "stream": False,
        "n_probs": 0,
        "min_keep": 0,
        "stop": [],
    }


def _models(config: FakeLlamaConfig) -> dict[str, Any]:
    alias = config.alias
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": [""],
        "parameter_size": "",
        "quantization_level": "",
    }
    ollama_style = {
        "name": alias, "model": alias, "modified_at": "", "size": "", "digest": "", "type": "model",
        "description": "", "tags": [""], "capabilities": ["completion"], "parameters": "", "details": details,
    }
    meta = {
        "vocab_type": 2,
        "n_vocab": 49152,
        "n_ctx_train": 8192,
        "n_ctx": config.n_ctx,
        "n_embd": 576,
        "n_params": 134515008,
        "size": 98_000_000,
    }
    openai_style = {
        "id": alias, "aliases": [alias], "tags": [], "object": "model", "created": int(time.time()),
        "owned_by": "llamacpp", "meta": meta,
    }
    return {"models": [ollama_style], "object": "list", "data": [openai_style]}


def _props(config: FakeLlamaConfig) -> dict[str, Any]:
    alias = config.alias
    return {
        "default_generation_settings": {"params": default_params(), "n_ctx": config.n_ctx},
        "total_slots": config.slots,
        "model_alias": alias,
        "model_path": f"/fake/{alias}.gguf",
        "modalities": {"vision": False, "audio": False},
        "endpoint_slots": True,
        "endpoint_props": False,
        "endpoint_metrics": True,
        "webui": False,
        "chat_template": CHAT_TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "build_info": BUILD_INFO,
        "is_sleeping": False,
    }


@dataclass(frozen=True)
class Prepared:
    """One config with its derived pieces; rebuilt whenever the config changes."""

    config: FakeLlamaConfig
    alias_json: bytes
    reply_tokens: tuple[str, ...]  # with leading spaces, as streamed
    reply_json: tuple[bytes, ...]  # each token JSON-encoded
    # The tokens of the second and later repetitions (``ignore_eos``): the first carries a leading space, so
    # "server. Hello" re-tokenizes in a later prompt exactly as the slot cached it, as a real tokenizer's would.
    repeat_tokens: tuple[str, ...]
    repeat_json: tuple[bytes, ...]
    reply_plain: tuple[str, ...]  # as the tokenizer sees them in a later prompt
    models_body: bytes
    props_body: bytes

    @classmethod
    def build(cls, config: FakeLlamaConfig) -> Prepared:
        tokens = reply_tokens(config.reply)
        repeat = (tokens[0] if tokens[0][:1].isspace() else " " + tokens[0], *tokens[1:])
        return cls(
            config=config,
            alias_json=dumps(config.alias),
            reply_tokens=tokens,
            reply_json=tuple(dumps(t) for t in tokens),
            repeat_tokens=repeat,
            repeat_json=tuple(dumps(t) for t in repeat),
            reply_plain=tuple(t.strip() for t in tokens),
            models_body=dumps(_models(config)),
            props_body=dumps(_props(config)),
        )

    def text(self, generated: int) -> str:
        """The first `generated` tokens of the reply, repeated (`ignore_eos`) as far as needed."""
        reply_len = len(self.reply_tokens)
        return "".join(self.reply_tokens[:generated]) + "".join(
            self.repeat_tokens[i % reply_len] for i in range(reply_len, generated)
        )

    def cached_reply(self, generated: int) -> tuple[str, ...]:
        """The generated tokens a slot's KV keeps: all but the last, as a later prompt tokenizes them."""
        plain = self.reply_plain
        return tuple(plain[i % len(plain)] for i in range(generated - 1))
