"""How long a request's answer takes on each backend: learned decode speeds and expected answer lengths.

Decode speed: llama.cpp reports ``timings.predicted_ms`` over ``predicted_n`` generated tokens with every
answer (``Usage.decode_token_seconds``); an exponentially weighted mean per backend, and the fleet's for a
backend not heard from yet. It is measured under whatever load the backend carried, so a server that
slows as its slots fill reads slower when busy; a half-speed server reads half speed.

Answer length: the request's own limit (OpenAI ``max_tokens`` / ``max_completion_tokens``, llama.cpp
``n_predict``, Ollama ``options.num_predict``), at most ``_LIMIT_MULTIPLE`` times the mean answer learned
from usage (a limit is a ceiling, and clients set generous ones); the mean when the request sets none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.usage import Usage

# Slow: one answer's speed swings with the batch it shared (1 to all slots busy); servers of one speed must
# not look different by that noise, which would outweigh the prompt a server holds.
_WEIGHT = 0.05
# And what is left of it: speeds within this factor of the fastest backend's count as the fastest's, so only a
# really slower server (a half-speed one reads 2x) weighs against a prompt cache held there.
_SAME_SPEED = 1.3
# A backend's own speed is used once it has answered this many times (the fleet's until then): a first answer
# or two tell little (on a fake server answering at once, two equal servers read 1.5x apart).
_MIN_ANSWERS = 5
_LIMIT_MULTIPLE = 4.0
_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + _WEIGHT * (sample - previous)


def _limit(body: Mapping[str, Any] | None) -> float | None:
    if body is None:
        return None
    values = [body.get(name) for name in _LIMIT_FIELDS]
    options = body.get("options")
    if isinstance(options, Mapping):
        values.append(options.get("num_predict"))
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


class Decoding:
    __slots__ = ("_answers", "_fastest", "_rates", "fleet_seconds", "mean_tokens")

    def __init__(self) -> None:
        self._rates: dict[str, float] = {}  # backend name -> seconds per generated token
        self.fleet_seconds: float | None = None
        self.mean_tokens: float | None = None  # generated tokens per answer, fleet-wide
        self._fastest: float | None = None  # the least seconds per token among the rates in use
        self._answers: dict[str, int] = {}  # backend name -> answers learned from, up to _MIN_ANSWERS

    def learn(self, backend_name: str, usage: Usage) -> None:
        if usage.completion_tokens:
            self.mean_tokens = _ewma(self.mean_tokens, usage.completion_tokens)
        per_token = usage.decode_token_seconds
        if per_token is not None and per_token > 0 and (usage.completion_tokens or 0) > 1:
            self.fleet_seconds = _ewma(self.fleet_seconds, per_token)
            answers = self._answers.get(backend_name, 0)
            if answers < _MIN_ANSWERS:
                self._answers[backend_name] = answers + 1
            rates = self._rates
            rates[backend_name] = _ewma(rates.get(backend_name), per_token)
            self._fastest = min((rates[name] for name, n in self._answers.items() if n >= _MIN_ANSWERS), default=None)

    def expected_tokens(self, body: Mapping[str, Any] | None) -> float:
        """Tokens this request's answer is expected to have (0 before anything is known)."""
        limit = _limit(body)
        mean = self.mean_tokens
        if limit is None:
            return mean or 0.0
        return limit if mean is None else min(limit, _LIMIT_MULTIPLE * mean)

    def seconds(self, backend: Backend, tokens: float) -> float:
        """Seconds to generate ``tokens`` on ``backend`` (0 before any speed was learned)."""
        name = backend.name
        rate = self._rates.get(name) if self._answers.get(name, 0) >= _MIN_ANSWERS else self.fleet_seconds
        if rate is None:
            return 0.0
        fastest = self._fastest
        if fastest is not None and rate <= fastest * _SAME_SPEED:
            rate = fastest
        return tokens * rate

    def forget(self, backend_name: str) -> None:
        self._rates.pop(backend_name, None)
        self._answers.pop(backend_name, None)
        self._fastest = min((self._rates[n] for n, k in self._answers.items() if k >= _MIN_ANSWERS), default=None)
