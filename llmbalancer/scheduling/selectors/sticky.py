"""``sticky``: the same session goes to the same backend, so its prompt cache there is reused.

A wrapper over another policy (``--policy sticky`` wraps ``slot_aware``; ``sticky:prefix`` picks the
inner one). The session key is the first found of: an ``X-Session-ID`` header, the OpenAI ``user``
field, a username named in the system message ("user: alice", "username is alice"), the client
address; always combined with the model, so one user's chats with two models pin separately.

A pin lasts ``ttl`` seconds (default 180) after the session's last request. When the pinned backend
is not among the candidates (unhealthy, draining, gone, or with no free slot) the inner policy picks
and the session is re-pinned there; whether to wait for a full server instead is the inner policy's
``hold_for`` (``sticky:prefix`` may wait). Pins live in an LRU map bounded to ``max_sessions``;
expired pins are dropped as new ones are made. A pin is keyed by a 16-byte digest of the session key,
never the client's string: a megabyte-long ``user`` costs the map what a short one does.

Replicas: each pin made is told as a ``Memory("pin", backend, digest)``; one learned from another replica
pins the session here too (for ``ttl`` from when it arrived), so a session's next request finds its pin
whichever replica it reaches.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.usage import Usage
from llmbalancer.scheduling.selectors.base import Hold, Memory, MemorySink, RequestFacts, Selector, Waiting

_USERNAME = re.compile(r"\b(?:user(?:name)?|user id|user_id)\s*(?:is|:|=)\s*[\"']?([\w.@-]{1,64})", re.IGNORECASE)


def _system_text(facts: RequestFacts) -> str | None:
    messages = facts.body.get("messages") if facts.body is not None else None
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "system":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


def session_name(facts: RequestFacts) -> str:
    """The session as the client named it (readable, unbounded): what ``session_key`` digests."""
    model = facts.model or ""
    header = facts.headers.get("X-Session-ID")
    if header:
        return f"{model}\x00session:{header}"
    user = facts.body.get("user") if facts.body is not None else None
    if isinstance(user, str) and user:
        return f"{model}\x00user:{user}"
    system = _system_text(facts)
    if system:
        found = _USERNAME.search(system)
        if found:
            return f"{model}\x00user:{found.group(1).rstrip('.')}"
    return f"{model}\x00client:{facts.client}"


def session_key(facts: RequestFacts) -> bytes:
    return hashlib.blake2b(session_name(facts).encode(errors="surrogatepass"), digest_size=16).digest()


class Sticky(Selector):
    name = "sticky"

    def __init__(
        self,
        inner: Selector,
        ttl: float = 180.0,
        max_sessions: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self._ttl = ttl
        self._max = max_sessions
        self._clock = clock
        self._pins: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # key -> (backend, expiry)
        # pinned() and claimed() ask about one request in turn: its key is digested once.
        self._keyed: tuple[RequestFacts, bytes] | None = None

    def _key(self, facts: RequestFacts) -> bytes:
        keyed = self._keyed
        if keyed is not None and keyed[0] is facts:
            return keyed[1]
        key = session_key(facts)
        self._keyed = (facts, key)
        return key

    def entries_count(self) -> int:
        """Sessions pinned now (for the snapshot; expired pins are dropped as new ones are made)."""
        return len(self._pins)

    def pinned(self, facts: RequestFacts) -> str | None:
        pin = self._pins.get(self._key(facts))
        if pin is None or pin[1] < self._clock():
            return None
        return pin[0]

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        name = self.pinned(facts)
        if name is not None:
            for backend in candidates:
                if backend.name == name:
                    return backend
        return self.inner.select(candidates, facts)

    def hold_for(self, full: Sequence[Backend], free: Sequence[Backend], facts: RequestFacts) -> Hold | None:
        """The inner policy decides whether to wait for a full server (its cache, not the pin, is the saving);
        a pin to a free server needs no wait: ``select`` takes it."""
        name = self.pinned(facts)
        if name is not None and any(b.name == name for b in free):
            return None
        return self.inner.hold_for(full, free, facts)

    def bind(self, waiting: Sequence[Waiting]) -> tuple[int, Backend] | None:
        """The inner policy picks the request; it goes to its pinned backend when that one is free."""
        choice = self.inner.bind(waiting)
        if choice is None:
            return None
        name = self.pinned(waiting[choice[0]].facts)
        if name is not None:
            for backend in waiting[choice[0]].free:
                if backend.name == name:
                    return choice[0], backend
        return choice

    def claimed(self, backend: Backend, facts: RequestFacts) -> None:
        key = self._key(facts)
        self._pin(key, backend.name)
        if self.sink is not None:
            self.sink(Memory("pin", backend.name, key))
        self.inner.claimed(backend, facts)

    def _pin(self, key: bytes, backend_name: str) -> None:
        now = self._clock()
        self._pins[key] = (backend_name, now + self._ttl)
        self._pins.move_to_end(key)
        # Oldest first: refreshed pins move to the end, so expired ones gather at the front.
        while self._pins and (len(self._pins) > self._max or next(iter(self._pins.values()))[1] < now):
            self._pins.popitem(last=False)

    def share(self, sink: MemorySink | None) -> None:
        self.sink = sink
        self.inner.share(sink)

    def learn(self, memory: Memory) -> None:
        if memory.kind == "pin":
            self._pin(memory.key, memory.backend)
        else:
            self.inner.learn(memory)

    def completed(self, backend: Backend, facts: RequestFacts, usage: Usage | None) -> None:
        self.inner.completed(backend, facts, usage)

    def forget(self, backend_name: str) -> None:
        for key in [key for key, (name, _) in self._pins.items() if name == backend_name]:
            del self._pins[key]
        self.inner.forget(backend_name)
