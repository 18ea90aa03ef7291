"""One fleet: backends registered on any replica, seen by all, through membership's one way in.

What a source says of a backend (the configuration, a reload, the admin API) is a *record*: the spec, its
``source``, when (``at``, Unix seconds) and by which replica, and ``gone`` for a removal (a tombstone).
Records live in the ``{prefix}:fleet`` hash, last writer wins (by ``at``, then replica name; ``FLEET_PUT``
is atomic), and travel as ``f`` events. Applying one is ``membership.register`` with the record's source,
or ``Registry.remove`` (a drain started on one replica drains on all). Each replica then probes the
backend itself. Backends the configuration named at start-up are records at time 0: any later change,
on any replica, wins over them; a replica whose start-up configuration names a backend the others lack
adds it for all. Removing one is a reload or a ``DELETE``, never a restart without it.

Agents' heartbeats are not records: each heartbeat (and deregistration) received by one replica is passed
on as an ``a`` event and applied by the others as if received (``relayed``), so an agent may heartbeat
to any one replica and every replica runs the agent's TTL itself. DNS-discovered and supervised backends
are each replica's own (each resolves the names itself; an instance is a process on its host).

While Redis is away, changes are recorded here; on its return, ``merge`` puts back what is newer here
and applies what is newer there.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from llmbalancer.fleet.agents import Agents, Heartbeat
from llmbalancer.fleet.backend import Backend, BackendSpec
from llmbalancer.fleet.membership import Conflict, register
from llmbalancer.fleet.registry import Registry
from llmbalancer.state.scripts import SHA
from llmbalancer.state.store import Store

log = structlog.get_logger("llmbalancer.state")

SHARED_SOURCES = frozenset({"config", "api"})
_TOMBSTONE_S = 86_400.0  # a removal is remembered this long (a replica away longer may bring the backend back)


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    url: str
    kind: str
    max_concurrency: int | None
    models: tuple[str, ...]
    source: str
    at: float
    by: str
    gone: bool = False

    @classmethod
    def of(cls, backend: Backend, at: float, by: str, gone: bool = False) -> Record:
        return cls(backend.name, backend.url, backend.kind, backend.max_concurrency, backend.models, backend.source,
                   at, by, gone)

    @classmethod
    def parse(cls, raw: bytes | str) -> Record | None:
        try:
            data = json.loads(raw)
            record = cls(
                str(data["name"]), str(data["url"]), str(data["kind"]),
                None if data["max_concurrency"] is None else int(data["max_concurrency"]),
                tuple(str(m) for m in data["models"]), str(data["source"]), float(data["at"]), str(data["by"]),
                bool(data["gone"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        return record if record.source in SHARED_SOURCES else None

    def json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def newer_than(self, other: Record | None) -> bool:
        return other is None or (self.at, self.by) > (other.at, other.by)

    @property
    def spec(self) -> BackendSpec:
        return BackendSpec(self.name, self.url, self.kind, self.max_concurrency, self.models)


class FleetSync:
    def __init__(self, store: Store, registry: Registry, agents: Agents, me: str, maxlen: int) -> None:
        self._store = store
        self._registry = registry
        self._agents = agents
        self._me = me
        self._maxlen = maxlen
        self._records: dict[str, Record] = {
            b.name: Record.of(b, 0.0, me) for b in registry if b.source in SHARED_SOURCES
        }
        self._applying = False
        self._conflicts: set[str] = set()  # names logged as held here by another source (logged once each)
        registry.on_membership.append(self._changed)
        agents.on_heard.append(self._heard_here)

    # --- changes made here ----------------------------------------------------------------------

    def _changed(self, backend: Backend, action: str) -> None:
        if self._applying or backend.source not in SHARED_SOURCES:
            return
        record = Record.of(backend, time.time(), self._me, gone=action == "removing")
        previous = self._records.get(backend.name)
        if previous is not None and record.at <= previous.at:  # a clock behind another replica's: still later
            record = Record.of(backend, previous.at + 0.001, self._me, gone=record.gone)
        self._records[backend.name] = record
        self._put(record)

    def _put(self, record: Record) -> None:
        keys, maxlen, me = self._store.keys, self._maxlen, self._me

        def build(pipe: Pipeline) -> int:
            pipe.evalsha(SHA["fleet_put"], 2, keys.fleet, keys.events(me), record.name, record.json(), record.at,
                         record.by, me, maxlen)
            return 1

        self._store.send(build)

    def _heard_here(self, name: str, beat: Heartbeat | None) -> None:
        payload = json.dumps({"name": name, "beat": None if beat is None else beat.model_dump(mode="json")})
        fields = {"o": self._me, "t": "a", "d": payload}
        stream, maxlen = self._store.keys.events(self._me), self._maxlen
        self._store.send(lambda pipe: _xadd(pipe, stream, fields, maxlen))

    # --- changes heard of -----------------------------------------------------------------------

    def heard_record(self, raw: bytes) -> None:
        record = Record.parse(raw)
        if record is not None:
            self._apply(record)

    def heard_agent(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
            name = str(data["name"])
            beat = None if data["beat"] is None else Heartbeat.model_validate(data["beat"])
        except (ValueError, KeyError, TypeError, ValidationError):
            return
        try:
            if beat is None:
                self._agents.deregister(name, relayed=True)
            else:
                self._agents.heartbeat(name, beat, relayed=True)
        except Conflict as conflict:
            self._conflict(name, conflict.message)

    def _apply(self, record: Record) -> None:
        if not record.newer_than(self._records.get(record.name)):
            return
        self._records[record.name] = record
        current = self._registry.get(record.name)
        self._applying = True
        try:
            if record.gone:
                if current is not None and current.source == record.source and not self._registry.leaving(record.name):
                    self._registry.remove(record.name, f"removed on replica {record.by}")
                return
            change = register(self._registry, record.spec, record.source)
            if change.action != "unchanged":
                log.info("backend_shared", backend=record.name, action=change.action, by=record.by,
                         source=record.source)
        except Conflict as conflict:
            self._conflict(record.name, conflict.message)
        finally:
            self._applying = False

    def _conflict(self, name: str, message: str) -> None:
        if name not in self._conflicts:
            self._conflicts.add(name)
            log.warning("backend_share_conflict", backend=name, problem=message)

    # --- resynchronisation ----------------------------------------------------------------------

    async def merge(self, client: Redis) -> None:
        """(Re)connected: apply what Redis holds that is newer, put back what is newer here."""
        held: Mapping[Any, Any] = await client.hgetall(self._store.keys.fleet)  # type: ignore[misc]
        theirs = {r.name: r for raw in held.values() if (r := Record.parse(raw)) is not None}
        for record in theirs.values():
            self._apply(record)
        now = time.time()
        pipe = client.pipeline(transaction=False)
        for name, record in list(self._records.items()):
            if record.gone and record.at < now - _TOMBSTONE_S:
                del self._records[name]
                with contextlib.suppress(KeyError):
                    if theirs[name] == record:
                        pipe.hdel(self._store.keys.fleet, name)
            elif record.newer_than(theirs.get(name)):
                keys = self._store.keys
                pipe.evalsha(SHA["fleet_put"], 2, keys.fleet, keys.events(self._me), name, record.json(), record.at,
                             record.by, self._me, self._maxlen)
        await pipe.execute()


def _xadd(pipe: Pipeline, stream: str, fields: dict[str, str], maxlen: int) -> int:
    pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return 1
