"""Batch lines and the client key that made their batch (``owner``): each line holds one of the key's
in-flight places and counts a request in its minute while it runs, and its tokens when it ends; while the key
is at one of its limits the batch starts no line, and the runner looks again when the minute turns (``wait``)."""

from __future__ import annotations

from llmbalancer.auth.gate import KeyGate
from llmbalancer.auth.keys import ApiKey
from llmbalancer.batches.active import ActiveBatch


class BatchKeys:
    __slots__ = ("_gate", "wait")

    def __init__(self, gate: KeyGate | None) -> None:
        self._gate = gate
        self.wait: float | None = None  # seconds until a batch held back by its key may go on (this step's least)

    def key_of(self, batch: ActiveBatch) -> ApiKey | None:
        """The key whose limits ``batch``'s lines count against (None: no keys, or that key is gone)."""
        if batch.owner is None or self._gate is None:
            return None
        key = self._gate.table.named(batch.owner)
        return key if key is not None and key.limited else None

    def held(self, batch: ActiveBatch) -> bool:
        """Whether ``batch`` may start no line now, its key being at a limit."""
        key = self.key_of(batch)
        if key is None or self._gate is None:
            return False
        wait = self._gate.limits.wait_for(key)
        if wait is None:
            return False
        self.wait = wait if self.wait is None else min(self.wait, wait)
        return True

    def started(self, key: ApiKey | None) -> None:
        if key is not None and self._gate is not None:
            self._gate.limits.line_started(key)

    async def counted(self, key: ApiKey | None) -> None:
        if key is not None and self._gate is not None:
            await self._gate.limits.count_line(key)

    async def ended(self, key: ApiKey | None, used: int) -> None:
        if key is not None and self._gate is not None:
            await self._gate.limits.line_ended(key, used)
