"""Each key's limits, counted: requests in flight (``max_concurrency``), requests and tokens per minute
(``rpm``, ``tpm``).

Minutes are fixed windows (``counters.window_of``: they start on the minute, so every replica agrees on
them) counted through a ``Counters``: in memory here, in Redis when the balancer runs as replicas, so that a
key limited to 60 rpm gets 60 across all of them. In-flight counts are this process's own.

Tokens are admitted against ``tpm`` with the request's ``max_tokens`` as the estimate, counted at once (so a
burst cannot all pass on one reading), and corrected to what the response's usage says (prompt +
completion) when it ends. A request refused here is not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmbalancer.auth.keys import ApiKey
from llmbalancer.counters import Counters, LocalCounters, window_of

WINDOW_S = 60.0
CONCURRENCY, REQUESTS, TOKENS = "concurrency", "requests", "tokens"


@dataclass(frozen=True, slots=True)
class Standing:
    """A key's counts in the current window as one admission saw them (after counting it)."""

    requests: int
    tokens: int
    reset_s: float  # seconds until the window ends
    window: int = 0  # which window (``counters.window_of``)


class LimitHeaders:
    """OpenAI's ``x-ratelimit-*`` headers for the limits a key has, made only when an answer is written: as
    (name, value) pairs for aiohttp's responses, as header lines for the lean relay's."""

    __slots__ = ("_key", "_standing")

    def __init__(self, key: ApiKey, standing: Standing) -> None:
        self._key = key
        self._standing = standing

    def __bool__(self) -> bool:
        return self._key.rpm is not None or self._key.tpm is not None

    def pairs(self) -> list[tuple[str, str]]:
        key, standing = self._key, self._standing
        reset = _duration(standing.reset_s)
        out = []
        if key.rpm is not None:
            out += [
                ("x-ratelimit-limit-requests", str(key.rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, key.rpm - standing.requests))),
                ("x-ratelimit-reset-requests", reset),
            ]
        if key.tpm is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(key.tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, key.tpm - standing.tokens))),
                ("x-ratelimit-reset-tokens", reset),
            ]
        return out

    def lines(self) -> bytes:
        key, standing = self._key, self._standing
        reset = _duration(standing.reset_s).encode()
        out = b""
        if key.rpm is not None:
            out = _REQUEST_LINES % (key.rpm, max(0, key.rpm - standing.requests), reset)
        if key.tpm is not None:
            out += _TOKEN_LINES % (key.tpm, max(0, key.tpm - standing.tokens), reset)
        return out


_REQUEST_LINES = (
    b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\nx-ratelimit-reset-requests: %s\r\n"
)
_TOKEN_LINES = b"x-ratelimit-limit-tokens: %d\r\nx-ratelimit-remaining-tokens: %d\r\nx-ratelimit-reset-tokens: %s\r\n"


@dataclass(frozen=True, slots=True)
class Refused:
    """Over a limit: which one, the counts that said so, and when to try again (seconds)."""

    limit: str  # CONCURRENCY, REQUESTS or TOKENS
    standing: Standing
    retry_after: float
    asked: int = 0  # tokens the request would have taken (TOKENS)


class KeyLimits:
    __slots__ = ("_clock", "_in_flight", "_local", "_seen", "counters")

    def __init__(self, counters: Counters | None = None, clock: Callable[[], float] = time.time) -> None:
        self.counters: Counters = counters if counters is not None else LocalCounters(clock=clock)
        self._clock = clock
        # Counting in memory: LocalCounters' own synchronous methods, without a coroutine per call.
        self._local = self.counters if type(self.counters) is LocalCounters else None
        self._in_flight: dict[str, int] = {}
        # The counts last seen per key (window, requests, tokens): the batch runner's synchronous check.
        self._seen: dict[str, tuple[int, int, int]] = {}

    def use(self, counters: Counters) -> None:
        """Count through ``counters`` from now on (shared ones, once the replicas' store is up)."""
        self.counters = counters
        self._local = counters if type(counters) is LocalCounters else None

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    @property
    def local(self) -> bool:
        """Counting in this process's memory: ``admit_now`` and ``release_now`` do it without awaiting."""
        return self._local is not None

    def admit_now(self, key: ApiKey, estimate: int) -> Standing | Refused:
        """``admit`` with counters in memory (``local``), synchronously: the same steps, none awaited (a
        coroutine per counter call would be most of what a key costs a request)."""
        local = self._local
        assert local is not None
        now = self._clock()
        reset = WINDOW_S - now % WINDOW_S
        window = window_of(WINDOW_S, now)  # given to every call: one clock reading per request
        name = key.name
        requests = tokens = 0
        if key.max_concurrency is not None and self._in_flight.get(name, 0) >= key.max_concurrency:
            requests = local.add(key.requests_counter, 0, WINDOW_S, window) if key.rpm is not None else 0
            tokens = local.add(key.tokens_counter, 0, WINDOW_S, window) if key.tpm is not None else 0
            return Refused(CONCURRENCY, Standing(requests, tokens, reset), 1.0)
        if key.rpm is not None:
            requests = local.add(key.requests_counter, 1, WINDOW_S, window)
            if requests > key.rpm:
                local.add(key.requests_counter, -1, WINDOW_S, window)
                tokens = local.add(key.tokens_counter, 0, WINDOW_S, window) if key.tpm is not None else 0
                return self._refused(key, REQUESTS, requests - 1, tokens, reset, now)
        if key.tpm is not None:
            tokens = local.add(key.tokens_counter, estimate, WINDOW_S, window)
            before = tokens - estimate
            if before >= key.tpm or tokens > key.tpm:
                if estimate:
                    local.add(key.tokens_counter, -estimate, WINDOW_S, window)
                if key.rpm is not None:
                    requests = local.add(key.requests_counter, -1, WINDOW_S, window)
                return self._refused(key, TOKENS, requests, before, reset, now, estimate)
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self._seen[name] = (window, requests, tokens)
        return Standing(requests, tokens, reset, window)

    async def admit(self, key: ApiKey, estimate: int) -> Standing | Refused:
        """Count one request of ``key`` that may take ``estimate`` tokens, or say which limit refuses it. An
        admitted request holds one of the key's in-flight places until ``release``. (In memory, ``admit_now``
        is the same without awaiting.)"""
        if self._local is not None:
            return self.admit_now(key, estimate)
        now = self._clock()
        reset = WINDOW_S - now % WINDOW_S
        name = key.name
        requests = tokens = 0
        if key.max_concurrency is not None and self._in_flight.get(name, 0) >= key.max_concurrency:
            return Refused(CONCURRENCY, await self._standing(key, reset), 1.0)
        if key.rpm is not None:
            requests = await self._add(key.requests_counter, 1)
            if requests > key.rpm:
                await self._add(key.requests_counter, -1)
                tokens = await self._read(key.tokens_counter) if key.tpm is not None else 0
                return self._refused(key, REQUESTS, requests - 1, tokens, reset, now)
        if key.tpm is not None:
            # Counted at once (one call in the usual case), taken back when it does not fit.
            tokens = await self._add(key.tokens_counter, estimate) if estimate else await self._read(key.tokens_counter)
            before = tokens - estimate
            if before >= key.tpm or tokens > key.tpm:
                if estimate:
                    await self._add(key.tokens_counter, -estimate)
                if key.rpm is not None:
                    requests = await self._add(key.requests_counter, -1)
                return self._refused(key, TOKENS, requests, before, reset, now, estimate)
        window = window_of(WINDOW_S, now)
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self._seen[name] = (window, requests, tokens)
        return Standing(requests, tokens, reset, window)

    def release_now(self, key: ApiKey, estimate: int, used: int | None, admitted_in: int) -> int:
        """The request admitted in window ``admitted_in`` is over: its in-flight place back; returns the tokens to
        add to correct its count from ``estimate`` to ``used`` (None: unknown, the estimate stands), added here
        when counting in memory."""
        name = key.name
        left = self._in_flight.get(name, 0) - 1
        if left > 0:
            self._in_flight[name] = left
        else:
            self._in_flight.pop(name, None)
        if key.tpm is None or used is None or used == estimate:
            return 0
        correction = used - estimate
        window = window_of(WINDOW_S, self._clock())
        if correction < 0 and window != admitted_in:
            return 0  # its estimate was counted in a window that has ended: nothing to take back from this one
        if self._local is not None:
            self._local.add(key.tokens_counter, correction, WINDOW_S, window)
            return 0
        return correction

    async def release(self, key: ApiKey, estimate: int, used: int | None, admitted_in: int) -> None:
        """``release_now``, and the correction counted when the counters are shared."""
        correction = self.release_now(key, estimate, used, admitted_in)
        if correction:
            await self._add(key.tokens_counter, correction)

    # --- batch lines: counted as they start and end, held back while the key is at a limit ---------------

    def wait_for(self, key: ApiKey) -> float | None:
        """Seconds until a batch line of ``key`` may start (by the counts last seen), None when it may now."""
        if key.max_concurrency is not None and self._in_flight.get(key.name, 0) >= key.max_concurrency:
            return 1.0
        now = self._clock()
        seen = self._seen.get(key.name)
        if seen is None or seen[0] != window_of(WINDOW_S, now):
            return None
        _, requests, tokens = seen
        if (key.rpm is not None and requests >= key.rpm) or (key.tpm is not None and tokens >= key.tpm):
            return WINDOW_S - now % WINDOW_S
        return None

    def line_started(self, key: ApiKey) -> None:
        """A line of ``key`` starts: it holds an in-flight place at once (``count_line`` counts it)."""
        self._in_flight[key.name] = self._in_flight.get(key.name, 0) + 1
        seen = self._seen.get(key.name)
        if key.rpm is not None:
            now = seen is not None and seen[0] == window_of(WINDOW_S, self._clock())
            self._saw(key, requests=(seen[1] if seen is not None and now else 0) + 1)

    async def count_line(self, key: ApiKey) -> None:
        if key.rpm is not None:
            self._saw(key, requests=await self._add(key.requests_counter, 1))

    async def line_ended(self, key: ApiKey, used: int) -> None:
        await self.release(key, 0, None, 0)
        if key.tpm is not None and used:
            self._saw(key, tokens=await self._add(key.tokens_counter, used))

    def _saw(self, key: ApiKey, requests: int | None = None, tokens: int | None = None) -> None:
        window = window_of(WINDOW_S, self._clock())
        seen = self._seen.get(key.name)
        old = seen if seen is not None and seen[0] == window else (window, 0, 0)
        self._seen[key.name] = (window, old[1] if requests is None else requests, old[2] if tokens is None else tokens)
        if len(self._seen) > 100_000:
            self._seen.clear()

    # --- counting -------------------------------------------------------------------------------------

    def _refused(
        self, key: ApiKey, limit: str, requests: int, tokens: int, reset: float, now: float, asked: int = 0
    ) -> Refused:
        self._seen[key.name] = (window_of(WINDOW_S, now), requests, tokens)
        return Refused(limit, Standing(requests, tokens, reset), reset, asked)

    async def _standing(self, key: ApiKey, reset: float) -> Standing:
        requests = await self._read(key.requests_counter) if key.rpm is not None else 0
        tokens = await self._read(key.tokens_counter) if key.tpm is not None else 0
        return Standing(requests, tokens, reset)

    async def _add(self, counter: str, amount: int) -> int:
        local = self._local
        if local is not None:
            return local.add(counter, amount, WINDOW_S)
        return await self.counters.incr(counter, amount, WINDOW_S)

    async def _read(self, counter: str) -> int:
        local = self._local
        if local is not None:
            return local.read(counter, WINDOW_S)
        return await self.counters.get(counter, WINDOW_S)


def _duration(seconds: float) -> str:
    """As OpenAI writes a reset time: ``20ms``, ``17s``, ``1m3s``."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    if whole < len(_WHOLE_SECONDS):
        return _WHOLE_SECONDS[whole]
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60}s"


_WHOLE_SECONDS = (*(f"{s}s" for s in range(60)), "1m0s")  # made once: one per request otherwise
