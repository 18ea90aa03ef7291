"""How fast the fleet gets through each model's requests: what admission by expected wait is based on.

Each request that completes reports how long it held its slot (claim to release). Per model, an
exponentially weighted mean ``S`` of that holding time; with ``C`` slots able to take the model, a full
fleet finishes about ``C / S`` requests a second, so a request with ``k`` waiters ahead of it expects a
slot after about ``(k + 1) * S / C`` seconds. That holds whatever the load (the holding time is measured
on every request, not only while the queue is full) and follows the load: decode slows as slots fill,
so ``S`` grows with it.

Before any request of a model completed, its estimate is the fleet's (every model pooled); before any
completed at all, there is none (the admission queue then admits up to its size cap). Memory is bounded:
at most ``max_models`` models are tracked, a client naming ever new models on an open fleet included.
"""

from __future__ import annotations

_WEIGHT = 0.05  # ~ the last 20 completions: smooth enough for a queue, quick to follow a change of load


class ServiceRate:
    __slots__ = ("_fleet", "_held", "_max_models", "_weight")

    def __init__(self, weight: float = _WEIGHT, max_models: int = 256) -> None:
        self._weight = weight
        self._max_models = max_models
        self._held: dict[str, float] = {}  # model -> mean seconds a request held its slot
        self._fleet: float | None = None  # the same over every model

    def completed(self, model: str, held_s: float) -> None:
        """A request for ``model`` finished after holding its slot ``held_s`` seconds."""
        if held_s < 0:
            return
        self._fleet = self._mean(self._fleet, held_s)
        held = self._held
        previous = held.get(model)
        if previous is None and len(held) >= self._max_models:
            held.pop(next(iter(held)))  # the oldest model tracked
        held[model] = self._mean(previous, held_s)

    def holding_time(self, model: str) -> float | None:
        """Mean seconds a ``model`` request holds a slot (the fleet's when the model has no record yet)."""
        return self._held.get(model, self._fleet)

    def expected_wait(self, model: str, ahead: int, slots: int) -> float | None:
        """Seconds until a slot frees for a request with ``ahead`` waiters before it, ``slots`` slots able to
        take it; None when nothing is known (no completion yet, or no slot count)."""
        held = self.holding_time(model)
        if held is None or slots <= 0:
            return None
        return (ahead + 1) * held / slots

    def _mean(self, previous: float | None, sample: float) -> float:
        return sample if previous is None else previous + self._weight * (sample - previous)
