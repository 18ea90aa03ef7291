"""Shared by the keys tests: a balancer with client keys, and OpenAI SDK clients for them."""

from __future__ import annotations

from typing import Any

import openai

from llmbalancer.config import Config
from tests.support import make_config

TEAM_A = "sk-team-a-0123456789abcdef"
TEAM_B = "sk-team-b-fedcba9876543210"
OBSERVER = "sk-observer-000000000000"
WRONG = "sk-wrong-key-000000000000"
ADMIN_TOKEN = "admin-token-for-the-keys-tests"
CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


def keyed_config(backends: list[str], *keys: dict[str, Any], **overrides: Any) -> Config:
    return make_config(backends, **{"auth.keys": list(keys)}, **overrides)


# A request sent with no key at all (the SDK needs one to start; this leaves its header out).
NO_KEY: Any = {"Authorization": openai.omit}


def client(url: str, key: str) -> openai.AsyncOpenAI:
    """The SDK as a user runs it; no retries of its own (it would retry a 429 after its Retry-After)."""
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30.0)
