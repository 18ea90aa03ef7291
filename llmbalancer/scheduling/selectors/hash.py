"""``hash``: the same key always goes to the same backend (the original llamafile balancer's policy).

The key is the client address by default, or a request header (``policy.hash_key: header:X-User``).
Unlike ``hash(key) % n`` with Python's per-process salted ``hash()``, this uses rendezvous
(highest-random-weight) hashing over a stable digest: the mapping survives restarts, and when a
backend leaves only the keys it held move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.selectors.base import RequestFacts, Selector


def stable_weight(key: str, backend_name: str) -> int:
    # surrogatepass: aiohttp decodes header bytes that are not UTF-8 as lone surrogates.
    digest = hashlib.blake2b(f"{key}\x00{backend_name}".encode(errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Hash(Selector):
    name = "hash"

    def __init__(self, key: str = "client") -> None:
        self._header = key.removeprefix("header:") if key.startswith("header:") else None

    def key_of(self, facts: RequestFacts) -> str:
        if self._header is not None:
            value = facts.headers.get(self._header)
            if value:
                return value
        return facts.client

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        key = self.key_of(facts)
        return max(candidates, key=lambda backend: stable_weight(key, backend.name))
