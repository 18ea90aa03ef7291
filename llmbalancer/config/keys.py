"""Client keys (``auth:``): each key's settings (``secrets.py`` reads the keys file and the variables).

A key is given one way: ``key`` (the secret itself), ``key_sha256`` (its SHA-256, hex: the file then holds
no secret) or ``key_env`` (a variable holding it). Its ``models`` are regular expressions matched in full
against the model a request names (none: every model).
"""

from __future__ import annotations

import hashlib
import re

from pydantic import Field, SecretStr, field_validator, model_validator

from llmbalancer.config.section import Count, Names, Section

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class KeyConfig(Section):
    """One client key: who it is (``name``: what logs, metrics and the monitor show), what it may use and
    how much of it."""

    name: str = Field(min_length=1, max_length=100, description="shown in logs, metrics and the monitor")
    key: SecretStr | None = Field(None, min_length=8, description="the secret itself (masked when shown)")
    key_sha256: str | None = Field(None, description="the secret's SHA-256 in hex, instead of the secret")
    key_env: str | None = Field(None, description="an environment variable holding the secret")
    models: Names = Field((), description="regular expressions matched in full; empty: every model")
    max_concurrency: Count | None = Field(None, ge=1, description="requests in flight at once")
    rpm: Count | None = Field(None, ge=1, description="requests per minute (fixed one-minute windows)")
    tpm: Count | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    priority: Count = Field(
        0, ge=-1000, le=1000, description="its requests' priority in the queue; X-Priority may lower it, never raise"
    )
    observe: bool = Field(False, description="may read /metrics, /llmhealth-snapshot and the monitor")
    enabled: bool = Field(True, description="false: refused as an unknown key")

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.fullmatch(value):
            raise ValueError("must be 64 hexadecimal digits (a SHA-256)")
        return None if value is None else value.lower()

    @field_validator("models")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        given = [n for n in ("key", "key_sha256", "key_env") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of key, key_sha256 or key_env (got {', '.join(given) or 'none'})")
        return self

    @property
    def digest(self) -> bytes | None:
        """The SHA-256 of the secret (None: ``key_env`` not resolved yet)."""
        if self.key is not None:
            return hashlib.sha256(self.key.get_secret_value().encode()).digest()
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        return None


class AuthConfig(Section):
    keys: tuple[KeyConfig, ...] = Field(
        (), description="any key here (or in keys_file): every proxied route and model list needs one"
    )
    keys_file: str | None = Field(
        None, description="a YAML list of keys (or {keys: [...]}), read at start-up and at every reload"
    )
