"""``prefix``: cache-aware routing; send a prompt to the server that most likely holds its prefix.

Why: a llama.cpp server reuses the prompt prefix it already evaluated (per slot, plus a server-wide
host-RAM prompt cache), so a follow-up chat turn sent back to the server that ran the previous turn
skips re-reading the whole history. We route to servers, not slots: the server picks its own slot.

Algorithm
1. The request's prompt text (chat ``messages`` as role + content in order, or ``prompt``) is cut
   into blocks of ``block_chars`` characters. Block i is named by a hash chained over blocks 0..i and
   the model, so equal names mean equal prefixes (a radix tree's paths, stored flat). The last,
   partial block is ignored.
2. Per backend, an index of the block names of prompts recently sent there: an LRU map bounded to
   ``max_blocks`` names (8 bytes of key each), so memory is bounded whatever the traffic.
3. The match on a backend is the number of leading blocks of the request found in its index.
4. Load gate, per candidate: only candidates whose busy count (requests in flight here plus slots
   other clients held at the last poll) is at most ``max_imbalance`` above the least busy candidate's
   may win on affinity. An overloaded holder of the prefix is skipped for this request only; the
   other requests keep their affinity (no fleet-wide switch).
5. Among those, the lowest *cost* wins: the blocks the backend would have to read (the prompt's blocks
   less its match there), plus (with ``protect_histories``) half the history the request may evict
   there (5b), times that backend's seconds per block (its own prompt rate, learned from llama.cpp
   ``timings``; the fleet's until it has one; plain block counts before anything is learned). So a
   follow-up goes home, and a prompt nobody holds goes to the server that reads it fastest. Costs
   within ``min_match_blocks`` blocks of each other count as equal, and then load decides (most free
   slots, as ``slot_aware``; then fewest served): a short match does not beat a free server.
5b. Protecting histories (``follow_ups.py``). llama.cpp sends a prompt to the idle slot sharing most
   with it, and restores a history from its RAM cache only when that slot would keep less than half of
   what it holds. So a chat with the same system prompt as a chat between turns on that server takes
   the waiting chat's slot, and the waiting chat's next turn lands on a slot it shares only the system
   prompt with: its history is re-read (measured on a real llama-server, 2 slots, 4 chats taking turns:
   follow-ups reused 53-70 % of their prompts with one system prompt, 84 % with four). So each
   backend's chats running or between turns are tracked by *family* (the name of their first
   ``min_match_blocks`` blocks: the system prompt), and a request that does not continue one of them
   there is charged half (the chance it takes that chat's slot) of their blocks beyond what it shares
   with them. New chats of one system prompt spread over the servers that hold it; a follow-up still
   goes to the server holding its history.
5c. Speed: the cost of placing a request (when slots are free, step 5) also counts its expected answer (its
   ``max_tokens``, at most four times the mean answer learned; the mean when it sets none) at each
   backend's decode speed, learned from llama.cpp ``timings.predicted_ms`` (``speeds.py``), as prompt
   speed is: a long answer goes to a fast server when both can take it. When a slot frees under load
   (step 9) it only breaks ties (a half-speed server takes the shorter answers): while every slot is busy,
   who decodes where changes nobody's time to first token, and a history re-read does.
6. Waiting for the holder (``hold_for``, asked before step 4 on a request's first attempt): when a
   *full* server holding at least ``min_match_blocks`` of the prompt costs less than every free server
   by at least that many blocks' reading (step 5), the request may wait for a slot there (in the
   admission queue, letting others pass) rather than re-read that part of its history elsewhere; after
   the wait, steps 4-5 over whatever is free. The wait is at most the seconds it would save (the cost
   difference; no prompt rate learned yet, no wait), and at most ``max_wait``. So a wait that does not
   pay off costs no more than the miss it tried to avoid. While a server is free, it waits only if the
   holder is expected to free a slot sooner than that (a mean answer at the holder's decode speed over its
   busy slots + 1): a long wait for a small saving is what made the tail at 80 % load.
7. On claim, the request's blocks are recorded (as most recent) in the chosen backend's index.
8. Closing the loop: llama.cpp reports the tokens it actually reused (``timings.cache_n``). When the
   index predicted at least half the prompt cached but the server reused under a quarter of what was
   predicted, the server lost its cache (restart, eviction): its index is reset to just this prompt,
   which it now does hold. A real hit re-marks the prompt's blocks as most recent.
9. From the slot's side (``bind``): while requests wait in the admission queue, a slot that frees is
   offered to a window of them (``queue.bind_window``, with ageing: ``binding.py``) and taken by one of
   them, first come, first served, but counting a request as having come six seconds earlier per second of
   prompt reading it saves there against the best other server it may take (step 5, without 5c): a
   follow-up whose history that server holds goes first, a new chat soon after, a follow-up whose history
   is elsewhere late. Then 5c (a longer answer to a faster server), then the queue's order.

Parameters (``policy.prefix_*`` in the configuration)
- ``block_chars`` (64): block size. Smaller finds shorter shared prefixes and costs more hashing;
  64 characters is about 16 tokens, finer than a system prompt and cheap to hash.
- ``min_match_blocks`` (4): the shortest match, in blocks (~256 characters), that beats load; also the
  length of a prompt's *family* (5b).
- ``max_imbalance`` (2): how many more busy requests than the least busy candidate a backend may
  carry and still win on affinity. 0 = only among the least busy; large = affinity at any load.
- ``max_blocks`` (65536): per-backend index size (~4 MiB of prompts at 64 characters a block).
- ``max_wait`` (1.0 s): a cap on that wait, whatever the estimate; 0 never waits.
- ``speed_aware`` (on): step 5c; off, the answer's length plays no part.
- ``protect_histories`` (on): step 5b. Off, new chats follow the longest match alone (as other
  cache-aware routers do) and pile onto the server that first saw their system prompt.
The capacity gate (no backend is shown to a policy without a free slot) applies before all this.

Replicas: steps 7 and 8 are told as ``Memory`` records (``placed``: the backend and the chain; ``done``:
the chain, whether the index was reset, and the usage numbers the rates learn from) and applied alike on
the other replicas, so each one's indexes, follow-ups and prompt rates mirror the whole deployment's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.capacity import busy
from llmbalancer.fleet.usage import Usage
from llmbalancer.scheduling.selectors.base import Hold, Memory, RequestFacts, Selector, Waiting
from llmbalancer.scheduling.selectors.follow_ups import FollowUps, family_of
from llmbalancer.scheduling.selectors.slot_aware import slot_rank
from llmbalancer.scheduling.selectors.speeds import Decoding

_MAX_PENDING = 10_000
_MAX_CHAINS = 1024  # hashed prompts kept for requests asked about and not yet claimed (the queue's window)
# Prefill rates are learned only from requests that evaluated at least this many prompt tokens: below it,
# fixed per-request overhead dominates prompt_ms.
_MIN_EVALUATED = 32
_EWMA_WEIGHT = 0.2
# The chance that a new chat placed beside a waiting chat of its family overwrites that chat's slot: the new
# one takes one of the (usually two) idle slots, and llama.cpp prefers the one that shares its prefix.
_RISK_WEIGHT = 0.5
_BLOCK_BYTES = 8  # a block name's size (block_chain's digest_size): chains travel between replicas as their join
# Binding from the slot's side (step 9): a waiting request counts as having come this many seconds earlier for
# each second of prompt reading it saves on the freed server. Measured on the saturated scenario (seeds 3, 11):
# 1 kept the tail lowest but the median went to first-come-first-served's; 6 kept the median of pure savings
# order (binding the most saving first) and most of the tail's gain.
_SAVING_CREDIT = 6.0


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + _EWMA_WEIGHT * (sample - previous)


def prompt_text(body: Any) -> str:
    """The prompt as the server will see it, in order, for prefix matching (not exact tokens)."""
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                # Only well-formed text parts: a client's {"text": 5} is the backend's to refuse, not a crash here.
                content = "".join(t for p in content if isinstance(p, dict) and isinstance(t := p.get("text"), str))
            parts.append(f"{message.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e")
        return "".join(parts)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def block_chain(text: str, model: str, block_chars: int) -> list[bytes]:
    chain: list[bytes] = []
    previous = model.encode("utf-8", "surrogatepass")
    for start in range(0, len(text) - block_chars + 1, block_chars):
        # surrogatepass: a lone surrogate (valid JSON "\ud800") hashes like any character, never raises.
        previous = hashlib.blake2b(
            previous + text[start : start + block_chars].encode("utf-8", "surrogatepass"), digest_size=_BLOCK_BYTES
        ).digest()
        chain.append(previous)
    return chain


class _Index:
    """One backend's recently sent prompt blocks, LRU-bounded."""

    __slots__ = ("_blocks", "_max")

    def __init__(self, max_blocks: int) -> None:
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self._max = max_blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, chain: Sequence[bytes]) -> int:
        count = 0
        for name in chain:
            if name not in self._blocks:
                break
            count += 1
        return count

    def touch(self, chain: Iterable[bytes]) -> None:
        blocks = self._blocks
        for name in chain:
            blocks[name] = None
            blocks.move_to_end(name)
        while len(blocks) > self._max:
            blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


class Prefix(Selector):
    name = "prefix"

    def __init__(
        self,
        block_chars: int = 64,
        min_match_blocks: int = 4,
        max_imbalance: int = 2,
        max_blocks: int = 65536,
        max_wait: float = 0.0,
        protect_histories: bool = True,
        speed_aware: bool = True,
    ) -> None:
        self.block_chars = block_chars
        self.min_match_blocks = min_match_blocks
        self.max_imbalance = max_imbalance
        self.max_blocks = max_blocks
        self.max_wait = max_wait
        self._indexes: dict[str, _Index] = {}
        self.follow_ups = FollowUps(min_match_blocks) if protect_histories else None
        # Per claimed request (by identity of its facts): its chain and the predicted match, until completed.
        self._pending: OrderedDict[int, tuple[list[bytes], int]] = OrderedDict()
        self.resets = 0  # indexes reset because the server had lost what we thought it held
        # Learned from completions, fleet-wide: what re-reading one character of prompt costs.
        self.tokens_per_char: float | None = None
        self.token_seconds: float | None = None  # to evaluate one (uncached) prompt token, fleet-wide
        self._rates: dict[str, float] = {}  # the same, per backend (a slower server reads prompts slower)
        self.decoding = Decoding()  # how long answers take where (learned from timings.predicted_ms)
        self.speed_aware = speed_aware
        # The dispatcher asks hold_for, select and claimed about a request, and bind about each queued one in its
        # window, pass after pass: a chain is hashed once per request, kept (by the facts' identity) until claimed.
        self._chains: OrderedDict[int, tuple[RequestFacts, list[bytes]]] = OrderedDict()

    def chain(self, facts: RequestFacts) -> list[bytes]:
        chained = self._chains.get(id(facts))
        if chained is not None and chained[0] is facts:
            return chained[1]
        chain = block_chain(prompt_text(facts.body), facts.model or "", self.block_chars)
        self._chains[id(facts)] = (facts, chain)
        if len(self._chains) > _MAX_CHAINS:
            self._chains.popitem(last=False)
        return chain

    def match(self, backend: Backend, chain: Sequence[bytes]) -> int:
        index = self._indexes.get(backend.name)
        return index.match(chain) if index is not None else 0

    def select(self, candidates: Sequence[Backend], facts: RequestFacts) -> Backend | None:
        chain = self.chain(facts)
        if chain:
            least_busy = min(busy(b) for b in candidates)
            near = [b for b in candidates if busy(b) <= least_busy + self.max_imbalance]
            cost = self._cost(chain, facts)
            decode = self._decode(facts)
            # Costs closer than the good-enough match count as equal: then the faster decoder (a long answer),
            # then load. The answer's decode only breaks ties: counted into the cost, it sent follow-ups whose
            # history a half-speed server held to a fast one, which re-read it (mixed fleet at 80 %: 68 %
            # cache hits and p99 1.36 s against 72 % and 1.10 s without it).
            quantum = self._quantum(chain)
            return min(near, key=lambda b: (cost(b) // quantum, decode(b) // quantum, slot_rank(b)))
        return min(candidates, key=slot_rank)

    def bind(self, waiting: Sequence[Waiting]) -> tuple[int, Backend] | None:
        """From the slot's side (step 9): first come, first served, except that a request counts as having come
        ``_SAVING_CREDIT`` seconds earlier for each second of prompt reading it saves on the free backend
        against the best other server it may take (a follow-up whose history that server holds), and as
        many later for each second it would lose there. Then a longer answer takes a faster server (its
        decode there against the mean of its servers'), then queue order, then load. Never leaves a free
        slot to wait for a better request: someone in the window takes it."""
        best: tuple[tuple[int, int, int, tuple[int, int, float, int]], int, Backend] | None = None
        for index, entry in enumerate(waiting):
            chain = self.chain(entry.facts)
            cost = self._cost(chain, entry.facts)
            decode = self._decode(entry.facts)
            quantum = self._quantum(chain)
            costs = [(b, cost(b)) for b in entry.allowed]
            mean_decode = sum(decode(b) for b in entry.allowed) / max(1, len(entry.allowed))
            for backend in entry.free:
                here = next((c for b, c in costs if b is backend), None)
                if here is None:
                    here = cost(backend)
                elsewhere = min((c for b, c in costs if b is not backend), default=here)
                saving = round((elsewhere - here) / quantum) * quantum
                credit = round((_SAVING_CREDIT * saving + entry.waited_s) / quantum)
                faster = round((mean_decode - decode(backend)) / quantum)
                key = (-credit, -faster, index, slot_rank(backend))
                if best is None or key < best[0]:
                    best = (key, index, backend)
        return None if best is None else (best[1], best[2])

    def _quantum(self, chain: Sequence[bytes]) -> float:
        """Seconds within which two costs count as equal: reading the good-enough match (or the whole prompt)."""
        return max(1, min(self.min_match_blocks, len(chain))) * self._block_seconds(None)

    def _cost(self, chain: Sequence[bytes], facts: RequestFacts) -> Callable[[Backend], float]:
        """What placing this prompt on a backend costs, in seconds: its unmatched blocks at that backend's
        learned prompt rate, plus (step 5b) half of what it may evict there of chats of its family (not when it
        is one)."""
        follow_ups = self.follow_ups
        home = follow_ups.continues(chain) if follow_ups is not None else None
        family = family_of(chain, self.min_match_blocks) if chain else b""
        length = len(chain)

        def cost(backend: Backend) -> float:
            matched = self.match(backend, chain)
            blocks = float(length - matched)
            if follow_ups is not None and chain and backend.name != home:
                blocks += _RISK_WEIGHT * follow_ups.at_risk(backend.name, family, matched)
            return blocks * self._block_seconds(backend)

        return cost

    def _decode(self, facts: RequestFacts) -> Callable[[Backend], float]:
        """Step 5c: seconds its expected answer takes at a backend's learned decode speed (0 when not speed-aware
        or before anything was learned)."""
        tokens = self.decoding.expected_tokens(facts.body) if self.speed_aware else 0.0
        seconds = self.decoding.seconds
        return lambda backend: seconds(backend, tokens)

    def _block_seconds(self, backend: Backend | None) -> float:
        """Seconds to evaluate one block on ``backend`` (None: fleet-wide); 1.0 (counting blocks) before any
        rate was learned."""
        rate = self.token_seconds if backend is None else self._rates.get(backend.name, self.token_seconds)
        if rate is None or self.tokens_per_char is None:
            return 1.0
        return self.block_chars * self.tokens_per_char * rate

    def hold_for(self, full: Sequence[Backend], free: Sequence[Backend], facts: RequestFacts) -> Hold | None:
        if self.max_wait <= 0 or not full:
            return None
        chain = self.chain(facts)
        if not chain:
            return None
        if self.tokens_per_char is None or self.token_seconds is None:
            return None  # no prompt rate learned yet: what a wait would save is unknown
        cost = self._cost(chain, facts)
        holder = min(full, key=lambda b: (cost(b), b.traffic.in_flight))
        enough = min(self.min_match_blocks, len(chain))
        if self.match(holder, chain) < enough:
            return None
        # What the wait saves over the best free server, in seconds (a free server with (nearly) the same
        # prefix saves as much at once; a holder where it would evict others' histories saves less).
        cold = len(chain) * self._block_seconds(holder)
        saved = min((cost(b) for b in free), default=cold) - cost(holder)
        if saved < enough * self._block_seconds(holder):
            return None
        # With a server free, the wait is what the request pays: worth it only if a slot on the holder is
        # expected sooner than the reading it saves. With none free it waits anyway, and waiting for the
        # holder costs little more (mixed fleet at 80 %: holding whatever the holder's load cost p99 1.37 s
        # against 1.12 s never holding; at 115 % never holding cost 8.76 s against 8.03 s and 2 % of hits).
        if free and self._first_free_in(holder) > saved:
            return None
        return Hold(holder, min(self.max_wait, saved))

    def _first_free_in(self, backend: Backend) -> float:
        """Seconds until one of ``backend``'s busy slots is expected to free: a mean answer there, spread over
        the answers running (started at even intervals, the first of n ends after 1/(n+1) of one); 0 before
        any decode speed was learned."""
        answer = self.decoding.seconds(backend, self.decoding.mean_tokens or 0.0)
        return answer / (busy(backend) + 1)

    def prefill_seconds(self, blocks: float, backend: Backend | None = None) -> float | None:
        """Estimated seconds to evaluate ``blocks`` prompt blocks (on ``backend``), or None before anything was
        learned."""
        if self.tokens_per_char is None or self.token_seconds is None:
            return None
        return blocks * self._block_seconds(backend)

    def claimed(self, backend: Backend, facts: RequestFacts) -> None:
        chain = self.chain(facts)
        self._chains.pop(id(facts), None)
        if not chain:
            return
        index = self._placed(backend.name, chain)
        self._pending[id(facts)] = (chain, index.match(chain))
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)
        index.touch(chain)
        if self.sink is not None:
            self.sink(Memory("placed", backend.name, b"".join(chain)))

    def _placed(self, backend_name: str, chain: list[bytes]) -> _Index:
        if self.follow_ups is not None:
            self.follow_ups.arrived(chain)
            self.follow_ups.started(backend_name, chain)
        return self._indexes.setdefault(backend_name, _Index(self.max_blocks))

    def completed(self, backend: Backend, facts: RequestFacts, usage: Usage | None) -> None:
        pending = self._pending.pop(id(facts), None)
        if pending is None:
            return
        chain, predicted = pending
        reset = False
        if usage is not None and usage.prompt_tokens and usage.cached_tokens is not None:
            predicted_share = predicted / len(chain)
            reset = predicted_share >= 0.5 and usage.cached_tokens / usage.prompt_tokens < predicted_share / 4
        self._done(backend.name, chain, usage, reset)
        if self.sink is not None:
            u = usage or Usage()
            numbers = (
                u.prompt_tokens, u.cached_tokens, u.prompt_token_seconds, u.completion_tokens, u.decode_token_seconds
            )
            values = (float(reset), *(-1.0 if n is None else float(n) for n in numbers))
            self.sink(Memory("done", backend.name, b"".join(chain), values))

    def _done(self, backend_name: str, chain: list[bytes], usage: Usage | None, reset: bool) -> None:
        if usage is not None:
            self.decoding.learn(backend_name, usage)
        if self.follow_ups is not None:
            self.follow_ups.finished(backend_name, chain)
        if usage is not None and usage.prompt_tokens:
            self._learn_rates(backend_name, len(chain), usage)
        index = self._indexes.get(backend_name)
        if index is None or usage is None or not usage.prompt_tokens or usage.cached_tokens is None:
            return
        if reset:
            index.clear()
            self.resets += 1
        index.touch(chain)

    def learn(self, memory: Memory) -> None:
        key = memory.key
        if memory.kind not in ("placed", "done") or not key or len(key) % _BLOCK_BYTES:
            return
        chain = [key[i : i + _BLOCK_BYTES] for i in range(0, len(key), _BLOCK_BYTES)]
        if memory.kind == "placed":
            self._placed(memory.backend, chain).touch(chain)
        elif len(memory.values) in (4, 6):  # 4: from a replica of before decode speeds were shared
            reset, prompt, cached, seconds, completion, decode = (*memory.values, -1.0, -1.0)[:6]
            usage = Usage(
                prompt_tokens=int(prompt) if prompt >= 0 else None,
                completion_tokens=int(completion) if completion >= 0 else None,
                cached_tokens=int(cached) if cached >= 0 else None,
                prompt_token_seconds=seconds if seconds >= 0 else None,
                decode_token_seconds=decode if decode >= 0 else None,
            )
            self._done(memory.backend, chain, usage, bool(reset))

    def _learn_rates(self, backend_name: str, blocks: int, usage: Usage) -> None:
        assert usage.prompt_tokens
        self.tokens_per_char = _ewma(self.tokens_per_char, usage.prompt_tokens / (blocks * self.block_chars))
        evaluated = usage.prompt_tokens - (usage.cached_tokens or 0)
        if usage.prompt_token_seconds is not None and evaluated >= _MIN_EVALUATED:
            self.token_seconds = _ewma(self.token_seconds, usage.prompt_token_seconds)
            self._rates[backend_name] = _ewma(self._rates.get(backend_name), usage.prompt_token_seconds)

    def remembers(self, backend_name: str) -> bool:
        """Whether it holds a prefix index of ``backend_name`` (dropped by ``forget``)."""
        return backend_name in self._indexes

    def forget(self, backend_name: str) -> None:
        self._indexes.pop(backend_name, None)
        self._rates.pop(backend_name, None)
        self.decoding.forget(backend_name)
        if self.follow_ups is not None:
            self.follow_ups.forget(backend_name)
