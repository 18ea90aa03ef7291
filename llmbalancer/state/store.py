"""The connection to Redis: every call bounded, one ordered writer, and whether Redis is up.

Each call has ``state.timeout`` (50 ms) to answer. A call that fails or times out marks the store *down*
(logged once, ``up`` False, listeners told): from then on nothing waits on Redis (``call`` answers None
at once, ``send`` drops), and whoever shares state serves from its own until the heartbeat's ``connect``
finds Redis again, resynchronises and marks it *up* (logged once).

Writes go through one courier: operations queued by many requests are sent together, in the order they
were queued, as one pipeline (one round trip), and each operation's commands are built when the batch
leaves, from the state of that moment (a slot count is written as it is then, not as it was when
queued). Because one batch at a time is in flight, a later write never overtakes an earlier one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llmbalancer.config import StateConfig, masked_url

log = structlog.get_logger("llmbalancer.state")

# An operation adds its commands to the batch's pipeline when the batch leaves (returning how many).
Build = Callable[[Pipeline], int]
_MAX_BATCH = 512
_MAX_QUEUED = 20_000  # beyond this (Redis slower than the requests): fire-and-forget writes are dropped
_CONNECT_TIMEOUT = 1.0  # (re)connecting may take longer than one call: a new TCP (or TLS) connection
FAILURES = (RedisError, OSError, TimeoutError, ValueError)


@dataclass(slots=True)
class _Op:
    build: Build
    done: asyncio.Future[list[Any] | None] | None
    key: object = None  # a coalescing key: a later op with the same key replaces this one, if still queued


class Keys:
    """Every key and channel, under the deployment's prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.replicas = f"{prefix}:replicas"  # hash: replica id -> "seen_ms\n{json}"
        self.slots_prefix = f"{prefix}:slots:"  # + replica id: hash backend -> requests in flight (leased)
        self.fleet = f"{prefix}:fleet"  # hash: backend name -> record (json; removed ones as tombstones)
        self.events_prefix = f"{prefix}:events:"  # + replica id: stream of what it tells the others (capped)

    def slots(self, replica: str) -> str:
        return self.slots_prefix + replica

    def events(self, replica: str) -> str:
        return self.events_prefix + replica

    def counter(self, key: str, window_s: float, window: int) -> str:
        return f"{self.prefix}:count:{window_s:g}:{window}:{key}"


class Store:
    def __init__(self, config: StateConfig) -> None:
        assert config.url is not None
        self.url = config.url
        self.keys = Keys(config.prefix)
        self.timeout = config.timeout
        self.up = False
        self.since = time.time()
        self.error: str | None = "not connected yet"
        self.client: Redis | None = None
        self.on_down: list[Callable[[], object]] = []
        self._queue: list[_Op] = []
        self._keyed: dict[object, _Op] = {}
        self._wake = asyncio.Event()
        self.came_up = asyncio.Event()
        self.round_trips = 0  # batches sent
        self.downs = 0  # times Redis was lost

    # --- up and down ------------------------------------------------------------------------

    def new_client(self, read_timeout: float | None = None) -> Redis:
        return Redis.from_url(
            self.url, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=read_timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )

    async def connect(self) -> Redis | None:
        """A fresh client that answered PING (the old one closed), or None; the store stays down meanwhile."""
        await self.close()
        client = self.new_client()
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await client.ping()
        except FAILURES as exc:
            await _close(client)
            self.error = _describe(exc)
            return None
        self.client = client
        return client

    def mark_up(self) -> None:
        if self.up:
            return
        self.up = True
        self.since = time.time()
        self.error = None
        self.came_up.set()
        log.info("state_store_up", url=masked_url(self.url))

    def down(self, exc: BaseException | str) -> None:
        """Redis failed us: serve from local state until the heartbeat reconnects. Logged once."""
        if not self.up:
            return
        self.up = False
        self.downs += 1
        self.since = time.time()
        self.error = exc if isinstance(exc, str) else _describe(exc)
        self.came_up.clear()
        log.warning("state_store_down", url=masked_url(self.url), error=self.error,
                    hint="serving from this replica's own state until Redis answers again")
        for observer in self.on_down:
            observer()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await _close(client)

    # --- calls ------------------------------------------------------------------------------

    async def call(self, build: Build) -> list[Any] | None:
        """The results of ``build``'s commands, sent in the next batch; None when Redis is down or failed."""
        if not self.up:
            return None
        done: asyncio.Future[list[Any] | None] = asyncio.get_running_loop().create_future()
        if not self._enqueue(_Op(build, done)):
            return None
        return await asyncio.shield(done)  # a caller that leaves does not cancel the batch for the others

    def send(self, build: Build, key: object = None) -> None:
        """Write in the next batch, unawaited; with ``key``, only the last write queued under it is sent."""
        if not self.up:
            return
        if key is not None:
            queued = self._keyed.get(key)
            if queued is not None:
                queued.build = build
                return
        op = _Op(build, None, key)
        if self._enqueue(op) and key is not None:
            self._keyed[key] = op

    def _enqueue(self, op: _Op) -> bool:
        if len(self._queue) >= _MAX_QUEUED:
            return False
        self._queue.append(op)
        self._wake.set()
        return True

    async def run_courier(self) -> None:
        """Send what is queued, one batch (one round trip) at a time, until cancelled."""
        try:
            while True:
                await self._wake.wait()
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                for op in batch:
                    if op.key is not None and self._keyed.get(op.key) is op:
                        del self._keyed[op.key]
                if not self._queue:
                    self._wake.clear()
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug in a build: that batch is lost, never the courier
                    log.error("state_batch_failed", error=repr(exc))
                    for op in batch:
                        _resolve(op, None)
        finally:
            for op in self._queue:
                _resolve(op, None)
            self._queue.clear()

    async def _send(self, batch: list[_Op]) -> None:
        client = self.client
        if not self.up or client is None:
            for op in batch:
                _resolve(op, None)
            return
        pipe = client.pipeline(transaction=False)
        sizes = [op.build(pipe) for op in batch]
        try:
            async with asyncio.timeout(self.timeout):
                results = await pipe.execute(raise_on_error=False)
        except FAILURES as exc:
            self.down(exc)
            for op in batch:
                _resolve(op, None)
            return
        finally:
            await pipe.reset()
        self.round_trips += 1
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:  # a script gone (Redis restarted under us) or refused: resynchronise
            self.down(failed)
        at = 0
        for op, size in zip(batch, sizes, strict=True):
            part = results[at : at + size]
            at += size
            _resolve(op, None if any(isinstance(r, Exception) for r in part) else part)


def _resolve(op: _Op, value: list[Any] | None) -> None:
    if op.done is not None and not op.done.done():
        op.done.set_result(value)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300] if text != type(exc).__name__ else text


async def _close(client: Redis) -> None:
    with contextlib.suppress(*FAILURES):
        await client.aclose()
