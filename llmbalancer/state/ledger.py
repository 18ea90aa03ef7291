"""The slot ledger: every replica's requests in flight per backend, counted together (``claims.SlotLedger``).

In Redis each replica has one hash, ``{prefix}:slots:{replica}``, backend -> its requests in flight there,
written whole as absolute counts (never incremented: a write lost or doubled cannot drift) and leased:
it expires ``state.lease`` after the replica's last write, so a replica killed with SIGKILL takes its
claims with it within the lease. Writes are ordered (one courier), so the count in Redis is never below
what the replica really has in flight.

- A claim is admitted by the ``COUNT`` script in one round trip: the other live replicas' counts on that
  backend plus ours (this claim included) must fit its capacity (slots, or ``max_concurrency``, less what
  other clients held at the last poll). The answer carries the others' counts, so a refused claim leaves
  the backend shown full here.
- A release writes our new count behind the request (coalesced per backend: one write carries every
  release queued before the batch leaves).
- Each write tells the other replicas (an ``s`` event) and the heartbeat reads every hash: a replica's
  view of the others (``Backend.in_flight_elsewhere``) follows within milliseconds, and is corrected at
  least every heartbeat. A count that falls wakes the requests queued here (a slot may have freed).
- Queues: each replica tells the others its first in line per model (priority, and since when it waits,
  on Redis's clock) whenever that changes (a ``q`` event), so the dispatcher can leave a free slot to an
  older request queued elsewhere (``goes_first_elsewhere``).
- Redis lost: the others' counts and queues are forgotten (each replica alone, its poller still seeing
  other clients' busy slots), and every claim is admitted locally.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.client import Pipeline

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.capacity import capacity
from llmbalancer.fleet.registry import Registry
from llmbalancer.state.scripts import SHA
from llmbalancer.state.store import Store

# Another replica's first in line goes first only when it has waited this much longer: the two clocks are
# compared through Redis's, each known to within a round trip.
_HEAD_TOLERANCE_MS = 5


class SharedLedger:
    def __init__(self, store: Store, registry: Registry, me: str, lease: float, maxlen: int) -> None:
        self._store = store
        self._registry = registry
        self._me = me
        self._lease_ms = int(lease * 1000)
        self._maxlen = maxlen
        self._peers: dict[str, dict[str, int]] = {}  # other replica -> backend -> requests in flight
        self._heads: dict[str, dict[str, tuple[int, int]]] = {}  # other replica -> model -> (priority, since ms)
        self._told_heads: dict[str, tuple[int, int] | None] = {}  # model -> what we last told of our own
        self.clock_offset_ms = 0  # Redis's clock less ours (set by each heartbeat)
        self.refusals = 0

    # --- claims (SlotLedger) --------------------------------------------------------------------

    async def admit(self, backend: Backend) -> bool:
        store = self._store
        if not store.up:
            return True
        if capacity(backend) is None:  # nothing to gate on: just count it
            self.released(backend)
            return True
        result = await store.call(lambda pipe: self._count(pipe, backend, admit=True))
        if result is None:
            return True  # Redis failed: degraded to the local gate, never a failed request
        admitted, others = result[0]
        self._heard_backend(backend.name, others)
        if not admitted:
            self.refusals += 1
        return bool(admitted)

    def released(self, backend: Backend) -> None:
        self._store.send(lambda pipe: self._count(pipe, backend, admit=False), key=("slots", backend.name))

    def _count(self, pipe: Pipeline, backend: Backend, admit: bool) -> int:
        # Built when the batch leaves: the count and the limit as they are then.
        limit = -1
        if admit:
            total = capacity(backend)
            limit = -1 if total is None else max(0, total - backend.health.slots_external)
        keys = self._store.keys
        pipe.evalsha(
            SHA["count"], 3, keys.slots(self._me), keys.replicas, keys.events(self._me),
            self._me, backend.name, max(0, backend.traffic.in_flight), limit, self._lease_ms, keys.slots_prefix,
            self._maxlen,
        )
        return 1

    # --- queues ---------------------------------------------------------------------------------

    def queue_head(self, model: str, head: tuple[int, float] | None) -> None:
        told = None if head is None else (head[0], int(head[1] * 1000) + self.clock_offset_ms)
        if self._told_heads.get(model, None) == told and model in self._told_heads:
            return
        self._told_heads[model] = told
        self._tell_head(model, told)

    def retell_heads(self) -> None:
        """Redis is back: what it missed of our queues (and a replica that replayed old news) is set right."""
        for model, told in self._told_heads.items():
            self._tell_head(model, told)

    def _tell_head(self, model: str, told: tuple[int, int] | None) -> None:
        data = f"{model}\n" if told is None else f"{model}\n{told[0]}\n{told[1]}"
        fields = {"o": self._me, "t": "q", "d": data}
        stream, maxlen = self._store.keys.events(self._me), self._maxlen
        self._store.send(lambda pipe: _xadd(pipe, stream, fields, maxlen), key=("head", model))

    def goes_first_elsewhere(self, model: str, priority: int, since: float) -> bool:
        if not self._heads:
            return False
        mine = int(since * 1000) + self.clock_offset_ms - _HEAD_TOLERANCE_MS
        for heads in self._heads.values():
            head = heads.get(model)
            if head is not None and (head[0] > priority or (head[0] == priority and head[1] < mine)):
                return True
        return False

    def heard_head(self, replica: str, data: bytes) -> None:
        model, _, rest = data.decode().partition("\n")
        heads = self._heads.setdefault(replica, {})
        if rest:
            priority, _, since = rest.partition("\n")
            heads[model] = (int(priority), int(since))
        else:
            heads.pop(model, None)
        self._registry.notify_change()  # a request here that left a slot to that one may take it now

    # --- what the heartbeat writes --------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {b.name: b.traffic.in_flight for b in self._registry if b.traffic.in_flight > 0}

    # --- what is heard of the others ------------------------------------------------------------

    def heard_event(self, replica: str, backend_name: str, count: int) -> None:
        self._peers.setdefault(replica, {})[backend_name] = count
        self._recount(backend_name)

    def heard_heartbeat(self, live: dict[str, dict[str, int]]) -> None:
        """Every live replica's whole hash (ours left out)."""
        names = {name for counts in (*self._peers.values(), *live.values()) for name in counts}
        self._peers = {replica: dict(counts) for replica, counts in live.items() if replica != self._me}
        self._heads = {replica: heads for replica, heads in self._heads.items() if replica in live}
        for backend in self._registry:
            names.add(backend.name)
        for name in names:
            self._recount(name)

    def forget_all(self) -> None:
        """Redis lost: the others' counts and queues are unknown from now on."""
        self._peers.clear()
        self._heads.clear()
        woke = False
        for backend in self._registry:
            woke |= backend.in_flight_elsewhere > 0
            backend.in_flight_elsewhere = 0
        if woke:
            self._registry.notify_change()

    def _heard_backend(self, backend_name: str, others: list[Any]) -> None:
        given = {_text(others[i]): int(others[i + 1]) for i in range(0, len(others) - 1, 2)}
        for replica, counts in self._peers.items():
            counts[backend_name] = given.pop(replica, 0)
        for replica, count in given.items():
            if replica != self._me:
                self._peers[replica] = {backend_name: count}
        self._recount(backend_name)

    def _recount(self, backend_name: str) -> None:
        backend = self._registry.get(backend_name)
        if backend is None:
            return
        total = sum(counts.get(backend_name, 0) for counts in self._peers.values())
        before = backend.in_flight_elsewhere
        if total == before:
            return
        backend.in_flight_elsewhere = total
        if total < before:
            self._registry.notify_change()  # a slot freed elsewhere: a request queued here may take it


def _xadd(pipe: Pipeline, stream: str, fields: dict[str, str], maxlen: int) -> int:
    pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
