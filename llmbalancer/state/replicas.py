"""Service: this replica among the others sharing ``state.url``.

Three loops, one service (``run``):

- the courier (``store.py``): every write, in order, batched;
- the heartbeat, every ``state.heartbeat`` (1 s): this replica's slot counts rewritten whole and leased,
  it stamped seen, every replica and its counts read back (``HEARTBEAT``: one round trip). While Redis is
  away it tries to reconnect instead, and once it answers, resynchronises (scripts loaded, counts written,
  the fleet merged, counters added) before the store is up again;
- the events reader: ``XREAD`` on the other replicas' streams, ``{prefix}:events:{replica}`` (``s`` slot
  counts, ``q`` queue heads, ``f`` fleet records, ``a`` agents' heartbeats, ``m`` policy memories), each
  applied where it belongs. A stream is read from where this replica left it, or for one first seen from ``REPLAY_S``
  back: a replica that starts or comes back catches up (memories and records; counts and heartbeats only
  within the lease). One stream per replica: nobody reads its own events.

On a clean stop the replica leaves: its entry and slot hash are deleted (a killed one's expire).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from llmbalancer.config import Config, ServerConfig, masked_url
from llmbalancer.fleet.agents import Agents
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.dispatch import Dispatcher
from llmbalancer.state.counters import SharedCounters
from llmbalancer.state.fleet_sync import FleetSync
from llmbalancer.state.ledger import SharedLedger
from llmbalancer.state.memory import REPLAY_S, SharedMemory
from llmbalancer.state.scripts import SCRIPTS, SHA
from llmbalancer.state.store import FAILURES, Store

log = structlog.get_logger("llmbalancer.state")

_BLOCK_MS = 1000  # an events read waits this long for news, then asks again
_READ_COUNT = 2000
_RESYNC_TIMEOUT = 5.0
_LEAVE_TIMEOUT = 0.5


def default_id(server: ServerConfig) -> str:
    """host:port and a random suffix: two replicas (or one restarted) never share a name by accident."""
    return f"{socket.gethostname()}:{server.port}-{secrets.token_hex(2)}"


def default_address(server: ServerConfig) -> str:
    host = socket.gethostname() if server.host in ("0.0.0.0", "::", "") else server.host
    return f"http://{f'[{host}]' if ':' in host else host}:{server.port}"


class Replicas:
    name = "replicas"

    def __init__(self, config: Config, registry: Registry, dispatcher: Dispatcher, agents: Agents) -> None:
        state = config.state
        self.id = state.replica or default_id(config.server)
        self.address = state.address or default_address(config.server)
        self.started = time.time()
        self.store = store = Store(state)
        maxlen = state.memory_entries
        self.ledger = SharedLedger(store, registry, self.id, state.lease, maxlen)
        self.memory = SharedMemory(store, registry, lambda: dispatcher.selector, self.id, maxlen,
                                   config.policy.sticky_ttl)
        self.fleet = FleetSync(store, registry, agents, self.id, maxlen)
        self.counters = SharedCounters(store)
        self._interval = state.heartbeat
        self._lease_s = state.lease
        self._info = json.dumps({"address": self.address, "started": self.started, "pid": os.getpid()})
        self._seen: list[dict[str, Any]] = []  # every replica, as of the last heartbeat
        self._last: dict[str, bytes] = {}  # replica -> the last event read from its stream
        self._clock_offset_ms = 0  # Redis's clock less ours
        self._said_unreachable = False
        store.on_down.append(self.ledger.forget_all)
        self.memory.adopt(dispatcher.selector)

    async def join(self) -> None:
        """Connect and resynchronise once, now (bounded); the heartbeat keeps trying if Redis is away."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_RESYNC_TIMEOUT + 1.0):
                await self._reconnect()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.store.run_courier(), name="state-courier")
                tasks.create_task(self._heartbeats(), name="state-heartbeat")
                tasks.create_task(self._events(), name="state-events")
        finally:
            await self._leave()

    # --- heartbeat ------------------------------------------------------------------------------

    def _heartbeat_args(self) -> list[Any]:
        keys = self.store.keys
        forget_ms = int(max(60.0, 10 * self._lease_s) * 1000)
        args: list[Any] = [SHA["heartbeat"], 3, keys.replicas, keys.slots(self.id), keys.events(self.id),
                           self.id, self._info, int(self._lease_s * 1000), forget_ms, keys.slots_prefix,
                           int(REPLAY_S * 1000)]
        for name, count in self.ledger.counts().items():
            args += [name, count]
        return args

    def _beat_into(self, pipe: Pipeline) -> int:
        pipe.evalsha(*self._heartbeat_args())
        return 1

    async def _heartbeats(self) -> None:
        if self.store.up:  # joined already
            await asyncio.sleep(self._interval)
        while True:
            try:
                if self.store.up:
                    result = await self.store.call(self._beat_into)
                    if result is not None:
                        self._heard_heartbeat(result[0])
                else:
                    await self._reconnect()
            except Exception as exc:  # never let the heartbeat die
                log.error("state_heartbeat_failed", error=repr(exc))
            await asyncio.sleep(self._interval)

    async def _reconnect(self) -> None:
        client = await self.store.connect()
        if client is None:
            if not self._said_unreachable:
                self._said_unreachable = True
                log.warning("state_store_unreachable", url=masked_url(self.store.url), error=self.store.error,
                            hint="serving from this replica's own state until Redis answers")
            return
        try:
            async with asyncio.timeout(_RESYNC_TIMEOUT):
                for source in SCRIPTS.values():
                    await client.script_load(source)
                self._heard_heartbeat(await client.evalsha(*self._heartbeat_args()))  # type: ignore[misc]
                await self.fleet.merge(client)
                await self.counters.flush(client)
        except FAILURES as exc:
            self.store.error = f"resynchronising: {exc!r}"[:300]
            return
        self._said_unreachable = False
        self.store.mark_up()
        self.ledger.retell_heads()

    def _heard_heartbeat(self, result: list[Any]) -> None:
        now_ms = int(result[0])
        self._clock_offset_ms = self.ledger.clock_offset_ms = now_ms - int(time.time() * 1000)
        seen: list[dict[str, Any]] = []
        live: dict[str, dict[str, int]] = {}
        for i in range(1, len(result) - 2, 3):
            replica, value, slots = _text(result[i]), result[i + 1], result[i + 2]
            stamp, _, raw = bytes(value).partition(b"\n")
            try:
                info = json.loads(raw)
                age = max(0.0, (now_ms - int(stamp)) / 1000)
            except ValueError:
                continue
            up = age <= self._lease_s
            seen.append({"id": replica, "address": info.get("address"), "last_seen": time.time() - age,
                         "up": up, "self": replica == self.id})
            if up and replica != self.id:
                live[replica] = {_text(slots[j]): int(slots[j + 1]) for j in range(0, len(slots) - 1, 2)}
        self._seen = seen
        self.ledger.heard_heartbeat(live)

    # --- events ---------------------------------------------------------------------------------

    async def _events(self) -> None:
        while True:
            await self.store.came_up.wait()
            client = self.store.new_client(read_timeout=_BLOCK_MS / 1000 + 1.0)
            try:
                await self._read(client)
            except FAILURES as exc:
                self.store.down(exc)
            except Exception as exc:
                log.error("state_events_failed", error=repr(exc))
                await asyncio.sleep(self._interval)
            finally:
                with contextlib.suppress(*FAILURES):
                    await client.aclose()

    async def _read(self, client: Redis) -> None:
        """Each other replica's stream, from where this one left it (a replica first seen: the last
        ``REPLAY_S`` seconds), until Redis is lost. Replicas that appear join at the next read (<= 1 s)."""
        keys = self.store.keys
        while self.store.up:
            horizon = f"{self._redis_ms() - int(REPLAY_S * 1000)}-0".encode()
            streams = {keys.events(r["id"]): self._last.get(r["id"], horizon) for r in self._seen if not r["self"]}
            if not streams:
                await asyncio.sleep(self._interval)  # alone: the next heartbeat may find another
                continue
            # redis-py's stream types are loose unions; with bytes replies: [(stream, [(id, {field: value})])].
            reply: Any = await client.xread(streams, count=_READ_COUNT, block=_BLOCK_MS)  # type: ignore[arg-type]
            for stream, entries in reply or ():
                replica = _text(stream).removeprefix(keys.events_prefix)
                for entry_id, fields in entries:
                    self._last[replica] = entry_id
                    self._heard(entry_id, fields)

    def _redis_ms(self) -> int:
        """Now on Redis's clock (which names the events), as of the last heartbeat's reading of it."""
        return int(time.time() * 1000) + self._clock_offset_ms

    def _heard(self, entry_id: bytes, fields: Mapping[bytes, bytes]) -> None:
        origin = fields.get(b"o")
        if origin is None or origin.decode(errors="replace") == self.id:
            return
        kind, data = fields.get(b"t"), fields.get(b"d", b"")
        try:
            age_s = max(0.0, (self._redis_ms() - _ms(entry_id)) / 1000)
            # Counts and heartbeats matter only while fresh (a heartbeat brings the counts whole anyway).
            fresh = age_s <= self._lease_s
            if kind == b"s" and fresh:
                backend, _, count = data.partition(b"\n")
                self.ledger.heard_event(origin.decode(), backend.decode(), int(count))
            elif kind == b"f":
                self.fleet.heard_record(data)
            elif kind == b"a" and fresh:
                self.fleet.heard_agent(data)
            elif kind == b"q" and fresh:
                self.ledger.heard_head(origin.decode(), data)
            elif kind == b"m":
                self.memory.heard(fields, age_s)
        except (ValueError, UnicodeDecodeError):
            return  # an event this version does not understand

    # --- leaving and describing -----------------------------------------------------------------

    async def _leave(self) -> None:
        client = self.store.client
        if self.store.up and client is not None:
            keys = self.store.keys
            with contextlib.suppress(*FAILURES):
                async with asyncio.timeout(_LEAVE_TIMEOUT):
                    await client.hdel(keys.replicas, self.id)  # type: ignore[misc]
                    await client.delete(keys.slots(self.id))
        self.store.up = False
        await self.store.close()

    def describe(self) -> dict[str, Any]:
        """``replica``, ``replicas`` and ``state_store`` of the snapshot."""
        store = self.store
        me = {"id": self.id, "address": self.address, "last_seen": time.time(), "up": True, "self": True}
        replicas = [me if r["self"] else r for r in self._seen] if any(r["self"] for r in self._seen) else [
            me, *self._seen]
        return {
            "replica": {"id": self.id, "address": self.address, "started": self.started},
            "replicas": replicas,
            "state_store": {
                "url": masked_url(store.url), "prefix": store.keys.prefix, "up": store.up, "since": store.since,
                "error": store.error, "downs": store.downs, "round_trips": store.round_trips,
                "refusals": self.ledger.refusals,
            },
        }


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])
