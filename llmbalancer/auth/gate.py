"""The check every proxied request passes once, whichever leg carries it (``Proxy.forward``): which key it
presents, whether that key may use its model, whether it is within the key's limits. The outcome is a
``Grant`` (released exactly once when the request ends) or a ``ProxyError``: 401 ``invalid_api_key``, 404
``model_not_found``, 429 ``rate_limit_exceeded`` with ``Retry-After``. A keyed request's answer, whatever it
is, carries OpenAI's ``x-ratelimit-*`` headers for the limits its key has (``Grant.headers``).

Without keys configured the gate is inactive and costs a request one attribute read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmbalancer import errors
from llmbalancer.auth.keys import ApiKey, KeyTable, presented
from llmbalancer.auth.limits import CONCURRENCY, REQUESTS, WINDOW_S, KeyLimits, LimitHeaders, Refused, Standing
from llmbalancer.config.keys import AuthConfig
from llmbalancer.counters import Counters

# Where a request body says how many tokens it may generate, by API (OpenAI's chat and completions, the
# Responses API, Anthropic's Messages).
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Grant:
    """One admitted request of one key: its rate-limit headers, and its in-flight place until ``release``."""

    __slots__ = ("_limits", "_window", "estimate", "headers", "key", "released")

    def __init__(self, key: ApiKey, limits: KeyLimits, estimate: int, standing: Standing | None) -> None:
        self.key = key
        self._limits = limits
        self.estimate = estimate
        self.headers = LimitHeaders(key, standing) if standing is not None else None
        self._window = standing.window if standing is not None else 0
        self.released = False

    def release(self, used: int | None) -> int:
        """The request is over; ``used``: the tokens its response reported (prompt + completion), if any. Returns
        the tokens still to count (shared counters: ``settle`` them), 0 when nothing is left to do."""
        if self.released:
            return 0
        self.released = True
        if not self.key.limited:
            return 0
        return self._limits.release_now(self.key, self.estimate, used, self._window)

    async def settle(self, correction: int) -> None:
        """Count ``release``'s correction in the shared counters."""
        await self._limits.counters.incr(self.key.tokens_counter, correction, WINDOW_S)


class KeyGate:
    __slots__ = ("active", "limits", "table")

    def __init__(self, auth: AuthConfig | None = None, counters: Counters | None = None) -> None:
        self.limits = KeyLimits(counters)
        self.table = KeyTable(auth.keys if auth is not None else ())
        self.active = bool(self.table)  # keys are configured: every proxied request needs one (read per request)

    def configure(self, auth: AuthConfig) -> None:
        """A reload: the new keys apply to requests that arrive from now on (in-flight counts are kept by name)."""
        self.table = KeyTable(auth.keys)
        self.active = bool(self.table)

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey:
        """The key ``headers`` present; 401 when there is none or it is unknown."""
        secret = presented(headers)
        key = self.table.find(secret)
        if key is None:
            raise errors.invalid_api_key(secret is not None)
        return key

    def admit_now(self, key: ApiKey, model: str | None, body: Mapping[str, Any] | None) -> Grant:
        """``key``'s request for ``model``: its grant, or the ``ProxyError`` that answers it (404; ``RateLimited``,
        a 429 with the key's headers). Counting in memory only (``limits.local``); ``admit`` otherwise."""
        if not key.allows(model):
            raise errors.model_not_allowed(model or "")
        if not key.limited:
            return Grant(key, self.limits, 0, None)
        estimate = estimate_of(body) if key.tpm is not None else 0
        return self._granted(key, estimate, self.limits.admit_now(key, estimate))

    async def admit(self, key: ApiKey, model: str | None, body: Mapping[str, Any] | None) -> Grant:
        """``admit_now``, with counters wherever they are (in Redis, for replicas)."""
        if self.limits.local or not key.limited or not key.allows(model):
            return self.admit_now(key, model, body)
        estimate = estimate_of(body) if key.tpm is not None else 0
        return self._granted(key, estimate, await self.limits.admit(key, estimate))

    def _granted(self, key: ApiKey, estimate: int, outcome: Standing | Refused) -> Grant:
        if isinstance(outcome, Refused):
            raise RateLimited(refusal(key, outcome), LimitHeaders(key, outcome.standing))
        return Grant(key, self.limits, estimate, outcome)


class RateLimited(Exception):
    """A 429 and the rate-limit headers it goes out with."""

    def __init__(self, error: errors.ProxyError, headers: LimitHeaders) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = headers


def refusal(key: ApiKey, refused: Refused) -> errors.ProxyError:
    standing = refused.standing
    if refused.limit == CONCURRENCY:
        message = (f"Too many requests in flight for key '{key.name}': limit {key.max_concurrency}; "
                   "try again when one ends")
        return errors.rate_limited(message, "requests", refused.retry_after)
    if refused.limit == REQUESTS:
        message = (f"Rate limit reached for key '{key.name}' on requests per min (RPM): limit {key.rpm}, "
                   f"used {standing.requests}. Please try again in {refused.retry_after:.0f}s.")
        return errors.rate_limited(message, "requests", refused.retry_after)
    message = (f"Rate limit reached for key '{key.name}' on tokens per min (TPM): limit {key.tpm}, used "
               f"{standing.tokens}, requested {refused.asked}. Please try again in {refused.retry_after:.0f}s.")
    return errors.rate_limited(message, "tokens", refused.retry_after)


def estimate_of(body: Mapping[str, Any] | None) -> int:
    """The tokens a request says it may generate (its ``max_tokens``, by any of its APIs' names), else 0."""
    if body is None:
        return 0
    for name in _MAX_TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    options = body.get("options")  # Ollama
    if isinstance(options, Mapping):
        value = options.get("num_predict")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0
