"""Shared state: several replicas of one balancer behaving as one, through Redis (``state.url``).

Owns: the connection to Redis and its up/down (``store.py``), the Lua scripts (``scripts.py``), the slot
ledger of requests in flight per backend (``ledger.py``, a ``scheduling.claims.SlotLedger``), one fleet
(``fleet_sync.py``), one memory of sessions and prompts (``memory.py``), shared counters (``counters.py``,
a ``llmbalancer.counters.Counters``), and the service that ties them (``replicas.py``). Without
``state.url`` none of it runs: one process, everything in memory.

May import: ``config``, ``counters``, ``fleet``, ``scheduling`` (it is wired in by ``app.py``; nothing
below it imports it: they see it through ``SlotLedger``, ``Selector.share`` and registry hooks).
"""

from llmbalancer.state.replicas import Replicas

__all__ = ["Replicas"]
