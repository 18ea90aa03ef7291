"""One memory of sessions and prompts: what each replica's policy learns, told to all (``Selector.share``).

A policy that learns (``sticky``'s pins, ``prefix``'s placements and completions) hands each record to
``tell``, which queues it for the courier (never awaited by the request; dropped while Redis is away).
It travels as an ``m`` event on the replica's stream: ``k`` the kind, ``n`` the backend, ``b`` the key
(binary: a 16-byte session digest, a chain of 8-byte block names), ``v`` the numbers. Every other replica
applies it to its own policy with ``learn``, so ``select`` stays synchronous and local while its tables
mirror the whole deployment's. Each replica's stream keeps its last ``state.memory_entries`` events (and
outlives the replica by ``REPLAY_S``): a replica that starts or comes back replays those of the last
``REPLAY_S`` seconds (pins only within ``sticky_ttl``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from redis.asyncio.client import Pipeline

from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.selectors import Memory, Selector
from llmbalancer.state.store import Store

REPLAY_S = 600.0


class SharedMemory:
    def __init__(
        self, store: Store, registry: Registry, policy: Callable[[], Selector], me: str, maxlen: int,
        pin_ttl: float,
    ) -> None:
        self._store = store
        self._registry = registry
        self._policy = policy  # the dispatcher's current selector (a reload may swap it)
        self._me = me
        self._maxlen = maxlen
        self._pin_ttl = pin_ttl
        self.told = 0
        self.learned = 0

    def adopt(self, selector: Selector) -> None:
        """``selector`` (at start-up, or a reload's new one) tells what it learns."""
        selector.share(self.tell)

    def tell(self, memory: Memory) -> None:
        if not self._store.up:
            return
        self.told += 1
        fields: dict[str, str | bytes] = {
            "o": self._me, "t": "m", "k": memory.kind, "n": memory.backend, "b": memory.key,
            "v": ",".join(repr(v) for v in memory.values),
        }
        self._store.send(lambda pipe: _xadd(pipe, self._store.keys.events(self._me), fields, self._maxlen))

    def heard(self, fields: Mapping[bytes, bytes], age_s: float) -> None:
        """An ``m`` event from another replica, ``age_s`` seconds old (0 when live)."""
        try:
            kind = fields[b"k"].decode()
            backend = fields[b"n"].decode()
            key = fields.get(b"b", b"")
            raw = fields.get(b"v", b"")
            values = tuple(float(v) for v in raw.split(b",")) if raw else ()
        except (KeyError, UnicodeDecodeError, ValueError):
            return  # not ours to understand (another version): ignored
        if kind == "pin" and age_s > self._pin_ttl:
            return
        if self._registry.get(backend) is None:
            return  # a backend this replica does not know (yet): nothing to remember of it
        self.learned += 1
        self._policy().learn(Memory(kind, backend, key, values))


def _xadd(pipe: Pipeline, stream: str, fields: dict[str, str | bytes], maxlen: int) -> int:
    pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return 1
