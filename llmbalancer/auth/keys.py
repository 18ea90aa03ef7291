"""The client keys a balancer knows, looked up by the SHA-256 of the presented secret.

A lookup is one hash and one dict lookup, then ``hmac.compare_digest`` of the digests: no secret is ever
compared byte by byte, stored in the clear beyond the configuration, logged or shown. A request presents
its key as ``Authorization: Bearer <key>`` (what the OpenAI SDK sends) or ``x-api-key: <key>``
(Anthropic's SDK).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llmbalancer.config.keys import KeyConfig

_MAX_REMEMBERED_MODELS = 1024  # per key: model names judged against its patterns


@dataclass(eq=False, slots=True)
class ApiKey:
    """A key as the request path needs it."""

    name: str
    digest: bytes = field(repr=False)
    patterns: tuple[re.Pattern[str], ...] = ()
    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    priority: int = 0
    observe: bool = False
    _judged: dict[str, bool] = field(default_factory=dict, repr=False)
    # Its counters' names (limits.py), made once.
    requests_counter: str = field(init=False, repr=False)
    tokens_counter: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.requests_counter = f"key:{self.name}:requests"
        self.tokens_counter = f"key:{self.name}:tokens"

    @classmethod
    def of(cls, config: KeyConfig) -> ApiKey:
        digest = config.digest
        assert digest is not None, "key_env is resolved when the configuration is loaded"
        return cls(
            config.name, digest, tuple(re.compile(p) for p in config.models), config.max_concurrency, config.rpm,
            config.tpm, config.priority, config.observe,
        )

    @property
    def limited(self) -> bool:
        return self.max_concurrency is not None or self.rpm is not None or self.tpm is not None

    def allows(self, model: str | None) -> bool:
        """Whether this key may use ``model`` (a request naming none is judged by its route alone)."""
        if model is None or not self.patterns:
            return True
        judged = self._judged.get(model)
        if judged is None:
            judged = any(p.fullmatch(model) for p in self.patterns)
            if len(self._judged) >= _MAX_REMEMBERED_MODELS:
                self._judged.clear()  # client-chosen names: bounded
            self._judged[model] = judged
        return judged

    def allows_listed(self, name: str) -> bool:
        """For the model lists: Ollama's ``x:latest`` is the model ``x``."""
        return self.allows(name) or (name.endswith(":latest") and self.allows(name.removesuffix(":latest")))


class KeyTable:
    """The enabled keys, by digest."""

    __slots__ = ("_by_digest", "_by_name")

    def __init__(self, keys: Iterable[KeyConfig] = ()) -> None:
        enabled = [ApiKey.of(k) for k in keys if k.enabled]
        self._by_digest = {k.digest: k for k in enabled}
        self._by_name = {k.name: k for k in enabled}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self) -> list[str]:
        return list(self._by_name)

    def named(self, name: str) -> ApiKey | None:
        return self._by_name.get(name)

    def find(self, secret: str | None) -> ApiKey | None:
        if not secret:
            return None
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key


def presented(headers: Mapping[str, str]) -> str | None:
    """The secret a request presents: ``Authorization: Bearer <key>``, else ``x-api-key``; None when neither."""
    value = headers.get("Authorization")
    if value:
        scheme, _, secret = value.partition(" ")
        if scheme.lower() == "bearer" and secret.strip():
            return secret.strip()
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None
