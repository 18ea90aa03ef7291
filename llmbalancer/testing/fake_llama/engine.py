"""The slot engine of one server "process": slots, the FIFO of deferred requests beyond them, and the
per-slot and host-RAM prompt cache. Pure: no HTTP, no clock but the timeline's.

Slot choice and cache reuse follow llama.cpp's `get_available_slot` (docs/llama-server-api.md,
"Prompt cache and slot choice"): among idle slots with a cache, the largest `lcp / n_prompt` above
the similarity threshold (0.10), else the least recently used (ties to the highest id). When the slot
was picked by LRU or would keep < 50 % of its cache, its prompt is saved to the server-wide RAM cache
and the best saved prompt is restored into it (`server_prompt_cache::alloc` / `load`). With
`--cache-idle-slots` (llama.cpp's default) idle slots are saved there whenever a task starts.
A follow-up whose history is in RAM but that lands by similarity on a slot it keeps >= 50 % of (another
chat with the same system prompt) is not restored: the real server does the same.
A request beyond the slots waits in a FIFO; one whose client left while waiting stays counted as
deferred until a slot frees, then is launched and released at once ("Concurrency beyond the slots",
"Client disconnect").
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from llmbalancer.testing.fake_llama.config import FakeLlamaConfig
from llmbalancer.testing.fake_llama.metrics import Metrics
from llmbalancer.testing.fake_llama.prompt import lcp as _lcp
from llmbalancer.testing.fake_llama.stats import Stats

SIMILARITY = 0.10  # --slot-prompt-similarity default


class Slot:
    """One slot: its KV cache (as tokens) and what /slots shows of its task."""

    __slots__ = (
        "busy",
        "cache",
        "id",
        "id_task",
        "last_used",
        "n_cached",
        "n_decoded",
        "n_predict",
        "n_processed",
        "n_prompt_tokens",
        "params",
        "used",
    )

    def __init__(self, slot_id: int) -> None:
        self.id = slot_id
        self.busy = False
        self.used = False
        self.cache: tuple[str, ...] = ()
        self.last_used = 0
        self.id_task = 0
        self.n_prompt_tokens = 0
        self.n_processed = 0
        self.n_cached = 0
        self.n_decoded = 0
        self.n_predict = -1
        self.params: dict[str, Any] = {}

    def as_json(self, n_ctx: int) -> dict[str, Any]:
        """The slot's entry in `GET /slots`."""
        out: dict[str, Any] = {"id": self.id, "n_ctx": n_ctx, "speculative": False, "is_processing": self.busy}
        if not self.used:
            return out
        out["id_task"] = self.id_task
        if self.busy:
            n_remain = self.n_predict - self.n_decoded if self.n_predict >= 0 else -1
            out["n_prompt_tokens"] = self.n_prompt_tokens
            out["n_prompt_tokens_processed"] = self.n_processed
            out["n_prompt_tokens_cache"] = self.n_cached
            next_token = {
                "has_next_token": True,
                "has_new_line": False,
                "n_remain": n_remain,
                "n_decoded": self.n_decoded,
            }
        else:
            out["n_prompt_tokens"] = len(self.cache)
            out["n_prompt_tokens_processed"] = 0
            out["n_prompt_tokens_cache"] = 0
            next_token = {"has_next_token": False, "has_new_line": False, "n_remain": -1, "n_decoded": 0}
        out["params"] = self.params
        out["next_token"] = [next_token]
        return out


class _Waiter:
    __slots__ = ("future", "tokens")

    def __init__(self, future: asyncio.Future[tuple[Slot, int]], tokens: tuple[str, ...]) -> None:
        self.future = future
        self.tokens = tokens


class Engine:
    """One server "process": recreated on every start, like a restarted llama-server."""

    def __init__(self, config: FakeLlamaConfig, stats: Stats) -> None:
        self.n_ctx = config.n_ctx
        self.slots = [Slot(i) for i in range(config.slots)]
        self.waiters: deque[_Waiter] = deque()
        self.busy = 0
        self.ram: deque[tuple[str, ...]] = deque(maxlen=config.ram_cache_entries or None)
        self.ram_enabled = config.ram_cache_entries > 0
        self.cache_idle_slots = self.ram_enabled and config.cache_idle_slots
        self.task_seq = 0
        self.use_seq = 0
        self.start_unix = int(time.time())
        self.ready_at = 0.0
        self.stats = stats
        self.record_timeline = config.record_timeline
        self.metrics = Metrics()

    # --- slots

    async def acquire(self, tokens: tuple[str, ...]) -> tuple[Slot, int]:
        """A slot (chosen like the real server) and the LCP of its cache with `tokens`; FIFO when full."""
        if not self.waiters and self.busy < len(self.slots):
            taken = self._take(tokens)
            self._mark()
            return taken
        future: asyncio.Future[tuple[Slot, int]] = asyncio.get_running_loop().create_future()
        self.waiters.append(_Waiter(future, tokens))
        self.stats.max_deferred = max(self.stats.max_deferred, len(self.waiters))
        self._mark()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result()[0])
            raise

    def begin_task(self, slot: Slot, lcp: int, n_prompt: int, params: dict[str, Any], n_predict: int) -> int:
        """Start a task on an acquired slot; return `cache_n`: the LCP, less the one token always evaluated."""
        cache_n = min(lcp, max(n_prompt - 1, 0))
        self.task_seq += 1
        slot.used = True
        slot.id_task = self.task_seq
        slot.params = params
        slot.n_predict = n_predict
        slot.n_processed = n_prompt - cache_n
        slot.n_cached = cache_n
        slot.n_prompt_tokens = n_prompt
        slot.n_decoded = 0
        return cache_n

    def release(self, slot: Slot) -> None:
        """Free the slot and hand it to the first deferred request whose client is still there."""
        slot.busy = False
        self.busy -= 1
        self.use_seq += 1
        slot.last_used = self.use_seq
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.future.done():  # its client left while deferred: launched and released at once
                continue
            waiter.future.set_result(self._take(waiter.tokens))
            break
        self._mark()

    def _mark(self) -> None:
        if self.record_timeline:
            self.stats.timeline.append((time.monotonic(), self.busy, len(self.waiters)))

    def _take(self, tokens: tuple[str, ...]) -> tuple[Slot, int]:
        idle = [s for s in self.slots if not s.busy]
        slot, lcp = self._choose(idle, tokens)
        slot.busy = True
        self.busy += 1
        if self.cache_idle_slots:  # llama.cpp's --cache-idle-slots (on by default): save idle slots at each task
            for other in self.slots:
                if not other.busy:
                    self._save(other.cache)
        self.stats.max_processing = max(self.stats.max_processing, self.busy)
        return slot, lcp

    # --- the prompt cache

    def _choose(self, idle: list[Slot], tokens: tuple[str, ...]) -> tuple[Slot, int]:
        n = len(tokens)
        best: Slot | None = None
        best_lcp = 0
        best_sim = 0.0
        if n:
            for s in idle:
                if s.cache:
                    lcp = _lcp(s.cache, tokens)
                    sim = lcp / n
                    if sim > best_sim:
                        best, best_lcp, best_sim = s, lcp, sim
        by_lru = best is None or best_sim <= SIMILARITY
        if best is None or by_lru:
            slot = min(idle, key=lambda s: (s.last_used, -s.id))
            lcp = _lcp(slot.cache, tokens) if slot.cache else 0
        else:
            slot, lcp = best, best_lcp
        if self.ram_enabled and (by_lru or lcp < 0.5 * len(slot.cache)):
            self._save(slot.cache)
            lcp = self._restore(slot, tokens, lcp)
        return slot, lcp

    def _save(self, tokens: tuple[str, ...]) -> None:
        """`server_prompt_cache::alloc`: skip a prompt some entry holds whole, drop entries it holds whole,
        append it; the oldest entries leave beyond the limit."""
        if not tokens:
            return
        ram = self.ram
        n = len(tokens)
        if any(_lcp(saved, tokens) == n for saved in ram):
            return
        for saved in [saved for saved in ram if _lcp(saved, tokens) == len(saved)]:
            ram.remove(saved)
        ram.append(tokens)  # the deque's maxlen drops the oldest

    def _restore(self, slot: Slot, tokens: tuple[str, ...], lcp: int) -> int:
        """`server_prompt_cache::load`: the entry that keeps more of itself and covers more of the prompt than
        the slot does (and keeps >= 25 % of itself) moves into the slot; return the LCP now cached."""
        n = len(tokens)
        keep_best = lcp / len(slot.cache) if slot.cache else -1.0
        sim_best = lcp / n if n else 0.0
        found: tuple[str, ...] | None = None
        for saved in self.ram:
            saved_lcp = _lcp(saved, tokens)
            keep = saved_lcp / len(saved)
            if keep < 0.25:
                continue
            if keep_best < keep and sim_best < saved_lcp / n:
                keep_best, sim_best, found, lcp = keep, saved_lcp / n, saved, saved_lcp
        if found is not None:
            self.ram.remove(found)
            slot.cache = found
        return lcp

    # --- metrics

    def on_prompt(self, prompt_n: int, cache_n: int, seconds: float) -> None:
        self.metrics.on_prompt(prompt_n, cache_n, seconds, self.busy)

    def on_prediction(self, n_decoded: int, seconds: float, n_tokens: int) -> None:
        self.metrics.on_prediction(n_decoded, seconds, n_tokens, self.busy)

    def metrics_text(self) -> str:
        return self.metrics.text(self.busy, len(self.waiters))
