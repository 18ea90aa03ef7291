"""Counters in Redis (``llmbalancer.counters.Counters``): one count per key and fixed window, shared by every
replica. ``incr`` is ``INCRBY`` plus ``EXPIRE NX`` (the window's key lives two windows) in one round trip,
atomic where it matters: each replica's addition lands whole and the total it reads back includes every
addition before it. While Redis is away the counts go on here, in memory (``LocalCounters``: this replica's
only), and are added to Redis's when it returns (those of windows still current).
"""

from __future__ import annotations

import math
import time

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from llmbalancer.counters import LocalCounters, window_of
from llmbalancer.state.store import Store


class SharedCounters:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._local = LocalCounters()  # what was counted while Redis was away, added to it on return

    def _key(self, key: str, window_s: float, window: int) -> str:
        return self._store.keys.counter(key, window_s, window)

    async def incr(self, key: str, amount: int = 1, window_s: float = 60.0) -> int:
        window = window_of(window_s, time.time())
        name = self._key(key, window_s, window)
        ttl = math.ceil(2 * window_s)

        def build(pipe: Pipeline) -> int:
            pipe.incrby(name, amount)
            pipe.expire(name, ttl, nx=True)
            return 2

        result = await self._store.call(build)
        if result is None:
            return self._local.add(key, amount, window_s, window)
        return int(result[0])

    async def get(self, key: str, window_s: float = 60.0) -> int:
        name = self._key(key, window_s, window_of(window_s, time.time()))

        def build(pipe: Pipeline) -> int:
            pipe.get(name)
            return 1

        result = await self._store.call(build)
        if result is None:
            return self._local.read(key, window_s)
        return int(result[0] or 0)

    async def flush(self, client: Redis) -> None:
        """Redis is back: add what was counted meanwhile (windows that have ended are left behind)."""
        counts = self._local.drain()
        if not counts:
            return
        now = time.time()
        pipe = client.pipeline(transaction=False)
        for key, window_s, window, total in counts:
            if window == window_of(window_s, now):
                name = self._key(key, window_s, window)
                pipe.incrby(name, total)
                pipe.expire(name, math.ceil(2 * window_s), nx=True)
        try:
            await pipe.execute()
        except BaseException:
            for key, window_s, window, total in counts:
                self._local.add(key, total, window_s, window)
            raise
