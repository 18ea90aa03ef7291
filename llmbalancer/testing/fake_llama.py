"""A fake llama.cpp `llama-server`, faithful on the wire, with faults on cue.

This is the one fake backend of the project: tests and benchmarks use it for what the real
llama-server cannot show on cue (a crash mid-stream, a hang, a 500, a slow start, a fleet of slow
servers, thousands of requests per second). Its API and behaviour follow the probed real server
described in `/work/shared/llama-server-api.md` (status codes, JSON shapes, `Server: llama.cpp`,
`Keep-Alive: timeout=5, max=100`, SSE framing, 503 `Loading model`, /slots, /metrics, /props,
/v1/models, native /completion). Where it simplifies, the docstrings say so.

What it models:

* **Slots** (`FakeLlamaConfig.slots`), each with a prompt cache, and a FIFO of deferred requests beyond
  them, shown as `requests_processing` / `requests_deferred` in /metrics. A deferred request whose
  client went away stays counted in `requests_deferred` until a slot frees (as on the real server);
  a client disconnect while a request runs frees its slot at once.
* **Tokens**: a prompt is approximated as tokens by splitting on whitespace, with chat-template special
  tokens (`<|im_start|>`, ...) counted as one token each (`tokenize`). Chat requests are rendered with
  the SmolLM2 chat template, including its default system prompt when the request has none.
* **Prompt cache**: slot choice, LCP reuse (`cache_n = min(lcp, n_prompt - 1)`) and the server-wide
  host-RAM prompt cache follow `get_available_slot` (similarity 0.10; LRU with ties to the highest id;
  save/restore when picked by LRU or keeping < 50%, as `server_prompt_cache::alloc`/`load`) and, as with
  llama.cpp's default `--cache-idle-slots`, idle slots saved to it whenever a task starts. A follow-up whose
  history is in RAM but that lands by similarity on a slot it keeps >= 50% of (another chat with the same
  system prompt) is not restored: the real server does the same.
* **Timing**: `prefill_per_token` seconds per uncached prompt token before the first token, then
  `token_delay * (1 + batch_slowdown * (busy_slots - 1))` seconds between tokens: decoding slows as
  more slots share the batch (0, the default, is no slowdown). Stream headers are sent only when the
  first token exists. `record_timeline` keeps (monotonic time, busy slots, deferred) at every change,
  shown as `timeline` in the stats, so a benchmark can tell when requests waited here while another
  server had a free slot (`time.monotonic` is system-wide, so timelines of several processes align).
* **plain_openai** makes it a plain OpenAI-compatible server instead (see `FakeLlamaConfig.plain_openai`).
* **The reply** is `FakeLlamaConfig.reply`, one token per word (with its leading space). Generation ends
  with `finish_reason "stop"` when the reply runs out before the token limit, `"length"` otherwise; the
  request's `ignore_eos: true` (a real llama.cpp parameter) repeats the reply up to the limit. The limit
  is `max_tokens` / `max_completion_tokens` / `n_predict`, else `max_tokens_default`.

Faults (`FakeLlama.set_fault`, or `POST /_fake/fault {"mode": ..., ...}`, reset by `DELETE /_fake/fault`):

* `none`; `error_500` (an HTTP error with a llama-style JSON body, `status` default 500);
  `close_immediately` (abort the connection before any byte); `hang` (never answer until the fault is
  changed or the server stops; with `after_tokens` it stalls mid-stream while holding its slot);
  `crash_mid_stream` (abort the TCP connection after `after_tokens` tokens, default 2: a truncated
  chunked response; a non-streaming request is aborted before any byte); `loading` (503 Loading model).
* `paths`: where the fault applies; default the generation endpoints (`loading`: every path), `["*"]`
  for every path. `count`: how many requests it applies to before it resets itself (default: until reset).

Control and inspection endpoints (never faulted, never 503): `GET|POST|DELETE /_fake/fault`,
`GET|DELETE /_fake/stats`, `GET|POST /_fake/config`.

Run in-process with `async with run_fake_llama(FakeLlamaConfig(...)) as fake:` (or `run_fake_fleet`),
or as a process: `python -m llmbalancer.testing.fake_llama --port P [...]` (prints
`fake llama-server listening on http://HOST:PORT` once it serves, exits 0 on SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import re
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, cast, get_args

from aiohttp import web

__all__ = [
    "FAULT_MODES",
    "GENERATION_PATHS",
    "FakeLlama",
    "FakeLlamaConfig",
    "Fault",
    "FaultMode",
    "main",
    "run_fake_fleet",
    "run_fake_llama",
    "tokenize",
]

FaultMode = Literal["none", "crash_mid_stream", "hang", "error_500", "close_immediately", "loading"]
FAULT_MODES: tuple[str, ...] = get_args(FaultMode)

GENERATION_PATHS: frozenset[str] = frozenset(
    {"/v1/chat/completions", "/chat/completions", "/completion", "/completions", "/v1/completions"}
)
CONTROL_PREFIX = "/_fake/"
# llama.cpp's own endpoints, which a plain OpenAI-compatible server does not have.
LLAMA_ONLY_PATHS: frozenset[str] = frozenset({"/v1/health", "/slots", "/metrics", "/props"})

BUILD_INFO = "b1-0c1e570"
JSON_CT = "application/json; charset=utf-8"
SIMILARITY = 0.10  # --slot-prompt-similarity default
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


LOADING_BODY = _dumps({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
NOT_FOUND_BODY = _dumps({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}})
NO_SLOTS_ENDPOINT_BODY = _dumps({"error": {
    "code": 501, "message": "This server does not support slots endpoint. Start it with `--slots`",
    "type": "not_supported_error",
}})
NO_SLOT_BODY = _dumps({"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}})
HEALTH_OK_BODY = b'{"status":"ok"}'
SSE_HEADERS: Mapping[str, str] = {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"

_TOKEN_RE = re.compile(r"<\|[^|\s]*\|>|(?:(?!<\|)\S)+")
_REPLY_TOKEN_RE = re.compile(r"\s*\S+")


def tokenize(text: str) -> list[str]:
    """The fake's approximate tokenizer: whitespace-separated words, `<|special|>` tokens apart."""
    return _TOKEN_RE.findall(text)


def _lcp(a: Sequence[str], b: Sequence[str]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


# --------------------------------------------------------------------------------------------------
# Configuration and faults


@dataclass(frozen=True)
class FakeLlamaConfig:
    """How one fake llama-server behaves.

    `n_ctx` is the context per slot (the real `-c 4096 -np 2` gives 2048). `keepalive_timeout` and
    `keepalive_max` mimic cpp-httplib's idle close after 5 s and `Connection: close` on the 100th
    request of a connection. `ram_cache_entries` bounds the host-RAM prompt cache (0 disables it).
    """

    slots: int = 2
    alias: str = "smollm2"
    token_delay: float = 0.0
    prefill_per_token: float = 0.0
    load_time: float = 0.0
    reply: str = "Hello from the fake llama server."
    max_tokens_default: int = 16
    n_ctx: int = 2048
    keepalive_timeout: float = 5.0
    keepalive_max: int = 100
    ram_cache_entries: int = 32
    cache_idle_slots: bool = True  # llama.cpp's default: idle slots are saved to the RAM cache at each task start
    # llamafile's older server: /health carries slots_idle / slots_processing and /slots is not served
    # (501, as llama.cpp answers when started with --no-slots).
    legacy_health: bool = False
    batch_slowdown: float = 0.0
    record_timeline: bool = False
    # A plain OpenAI-compatible server (vLLM-like) instead of llama.cpp: no `timings` anywhere, `"usage":null`
    # in every chunk of a stream that asked for usage (as the OpenAI spec says), and only the OpenAI API
    # (/slots, /metrics, /props answer 404; /health answers 200 with an empty body, as vLLM's does).
    plain_openai: bool = False

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be >= 1")
        delays = (self.token_delay, self.prefill_per_token, self.load_time, self.keepalive_timeout, self.batch_slowdown)
        if min(delays) < 0:
            raise ValueError("delays and timeouts must be >= 0")
        if not self.reply.strip():
            raise ValueError("reply must contain at least one word")
        if self.max_tokens_default < 0 or self.n_ctx < 2 or self.keepalive_max < 1:
            raise ValueError("max_tokens_default >= 0, n_ctx >= 2 and keepalive_max >= 1 are required")
        if self.ram_cache_entries < 0:
            raise ValueError("ram_cache_entries must be >= 0")


# Fields of the config that may change while the server runs (`update_config`, POST /_fake/config).
RUNTIME_FIELDS = frozenset(
    {"alias", "token_delay", "prefill_per_token", "load_time", "reply", "max_tokens_default", "batch_slowdown"}
)


@dataclass(frozen=True)
class Fault:
    """A fault to inject; see the module docstring for the modes."""

    mode: FaultMode = "none"
    after_tokens: int | None = None
    count: int | None = None
    status: int = 500
    message: str = "fake llama-server: injected error"
    paths: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(FAULT_MODES)}")
        if self.after_tokens is not None and self.after_tokens < 0:
            raise ValueError("after_tokens must be >= 0")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1")
        if not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")

    def applies_to(self, path: str) -> bool:
        if self.mode == "none":
            return False
        if self.paths is None:
            return self.mode == "loading" or path in GENERATION_PATHS
        return "*" in self.paths or path in self.paths

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["paths"] = list(self.paths) if self.paths is not None else None
        return out


NO_FAULT = Fault()
_MID_STREAM_FAULT: contextvars.ContextVar[Fault | None] = contextvars.ContextVar("fake_llama_fault", default=None)


# --------------------------------------------------------------------------------------------------
# Engine state: slots, the deferred FIFO, the prompt cache, metrics


class _Slot:
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

    def __init__(self, future: asyncio.Future[tuple[_Slot, int]], tokens: tuple[str, ...]) -> None:
        self.future = future
        self.tokens = tokens


class _Engine:
    """One server "process": recreated on every start, like a restarted llama-server."""

    def __init__(self, config: FakeLlamaConfig, stats: _Stats) -> None:
        self.n_ctx = config.n_ctx
        self.slots = [_Slot(i) for i in range(config.slots)]
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
        # metrics counters
        self.prompt_tokens_total = 0
        self.prompt_tokens_cached_total = 0
        self.prompt_seconds_total = 0.0
        self.tokens_predicted_total = 0
        self.tokens_predicted_seconds_total = 0.0
        self.n_decode_total = 0
        self.n_tokens_max = 0
        # windowed since the previous /metrics scrape
        self.w_prompt_tokens = 0
        self.w_prompt_seconds = 0.0
        self.w_predicted_tokens = 0
        self.w_predicted_seconds = 0.0
        self.w_decodes = 0
        self.w_busy_slots = 0

    # --- slots

    async def acquire(self, tokens: tuple[str, ...]) -> tuple[_Slot, int]:
        """A slot (chosen like the real server) and the LCP of its cache with `tokens`; FIFO when full."""
        if not self.waiters and self.busy < len(self.slots):
            taken = self._take(tokens)
            self._mark()
            return taken
        future: asyncio.Future[tuple[_Slot, int]] = asyncio.get_running_loop().create_future()
        self.waiters.append(_Waiter(future, tokens))
        self.stats.max_deferred = max(self.stats.max_deferred, len(self.waiters))
        self._mark()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result()[0])
            raise

    def release(self, slot: _Slot) -> None:
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

    def _take(self, tokens: tuple[str, ...]) -> tuple[_Slot, int]:
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

    def _choose(self, idle: list[_Slot], tokens: tuple[str, ...]) -> tuple[_Slot, int]:
        n = len(tokens)
        best: _Slot | None = None
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

    def _restore(self, slot: _Slot, tokens: tuple[str, ...], lcp: int) -> int:
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
        self.prompt_tokens_total += prompt_n
        self.prompt_tokens_cached_total += cache_n
        self.prompt_seconds_total += seconds
        self.w_prompt_tokens += prompt_n
        self.w_prompt_seconds += seconds
        if prompt_n:
            self.n_decode_total += 1
            self.w_decodes += 1
            self.w_busy_slots += self.busy

    def on_prediction(self, n_decoded: int, seconds: float, n_tokens: int) -> None:
        self.tokens_predicted_total += n_decoded
        self.tokens_predicted_seconds_total += seconds
        self.w_predicted_tokens += n_decoded
        self.w_predicted_seconds += seconds
        decodes = max(n_decoded - 1, 0)  # the first token comes from the prompt's decode
        self.n_decode_total += decodes
        self.w_decodes += decodes
        self.w_busy_slots += decodes * max(self.busy, 1)
        self.n_tokens_max = max(self.n_tokens_max, n_tokens)

    def metrics_text(self) -> str:
        def rate(n: float, seconds: float) -> float:
            return n / seconds if seconds > 0 else 0.0

        rows: list[tuple[str, str, str, float]] = [
            ("prompt_tokens_total", "counter", "Number of prompt tokens processed.", self.prompt_tokens_total),
            (
                "prompt_tokens_cached_total",
                "counter",
                "Number of prompt tokens reused from the cache.",
                self.prompt_tokens_cached_total,
            ),
            ("prompt_seconds_total", "counter", "Prompt process time", self.prompt_seconds_total),
            (
                "tokens_predicted_total",
                "counter",
                "Number of generation tokens processed.",
                self.tokens_predicted_total,
            ),
            ("tokens_predicted_seconds_total", "counter", "Predict process time", self.tokens_predicted_seconds_total),
            ("n_decode_total", "counter", "Total number of llama_decode() calls", self.n_decode_total),
            ("n_tokens_max", "counter", "Largest observed n_tokens.", self.n_tokens_max),
            ("spec_decode_num_draft_tokens_total", "counter", "Number of speculative draft tokens.", 0),
            ("spec_decode_num_accepted_tokens_total", "counter", "Number of accepted draft tokens.", 0),
            ("spec_decode_num_drafts_total", "counter", "Number of speculative drafts.", 0),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s.",
                rate(self.w_prompt_tokens, self.w_prompt_seconds),
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s.",
                rate(self.w_predicted_tokens, self.w_predicted_seconds),
            ),
            ("requests_processing", "gauge", "Number of requests processing.", self.busy),
            ("requests_deferred", "gauge", "Number of requests deferred.", len(self.waiters)),
            (
                "n_busy_slots_per_decode",
                "gauge",
                "Average number of busy slots per llama_decode() call",
                self.w_busy_slots / self.w_decodes if self.w_decodes else 0.0,
            ),
        ]
        self.w_prompt_tokens = self.w_predicted_tokens = self.w_decodes = self.w_busy_slots = 0
        self.w_prompt_seconds = self.w_predicted_seconds = 0.0
        lines: list[str] = []
        for name, kind, help_text, value in rows:
            lines.append(f"# HELP llamacpp:{name} {help_text}")
            lines.append(f"# TYPE llamacpp:{name} {kind}")
            lines.append(f"llamacpp:{name} {value:g}" if isinstance(value, float) else f"llamacpp:{name} {value}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Stats for tests


@dataclass
class _RequestRecord:
    method: str
    path: str
    query: str
    headers: Any  # the request's CIMultiDictProxy, turned into a dict only when read
    body: bytes

    def as_dict(self) -> dict[str, Any]:
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            k = key.lower()
            headers[k] = f"{headers[k]}, {value}" if k in headers else value
        body: Any = None
        if self.body:
            try:
                body = json.loads(self.body)
            except ValueError:
                body = self.body.decode("utf-8", "replace")
        return {"method": self.method, "path": self.path, "query": self.query, "headers": headers, "body": body}


@dataclass
class _Stats:
    requests: dict[str, int] = field(default_factory=dict)
    requests_total: int = 0
    completed: int = 0
    cancelled: int = 0
    faults_applied: int = 0
    max_processing: int = 0
    max_deferred: int = 0
    last: _RequestRecord | None = None
    last_by_path: dict[str, _RequestRecord] = field(default_factory=dict)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # only with record_timeline


# --------------------------------------------------------------------------------------------------
# Per-config precomputed pieces


@dataclass(frozen=True)
class _Prepared:
    config: FakeLlamaConfig
    alias_json: bytes
    reply_tokens: tuple[str, ...]  # with leading spaces, as streamed
    reply_json: tuple[bytes, ...]  # each token JSON-encoded
    # The tokens of the second and later repetitions (``ignore_eos``): the first carries a leading space, so
    # "server. Hello" re-tokenizes in a later prompt exactly as the slot cached it, as a real tokenizer's would.
    repeat_tokens: tuple[str, ...]
    repeat_json: tuple[bytes, ...]
    reply_plain: tuple[str, ...]  # as the tokenizer sees them in a later prompt
    models_body: bytes
    props_body: bytes

    @classmethod
    def build(cls, config: FakeLlamaConfig) -> _Prepared:
        tokens = tuple(_REPLY_TOKEN_RE.findall(config.reply))
        repeat = (tokens[0] if tokens[0][:1].isspace() else " " + tokens[0], *tokens[1:])
        alias = config.alias
        models = {
            "models": [
                {
                    "name": alias,
                    "model": alias,
                    "modified_at": "",
                    "size": "",
                    "digest": "",
                    "type": "model",
                    "description": "",
                    "tags": [""],
                    "capabilities": ["completion"],
                    "parameters": "",
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "",
                        "families": [""],
                        "parameter_size": "",
                        "quantization_level": "",
                    },
                }
            ],
            "object": "list",
            "data": [
                {
                    "id": alias,
                    "aliases": [alias],
                    "tags": [],
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "llamacpp",
                    "meta": {
                        "vocab_type": 2,
                        "n_vocab": 49152,
                        "n_ctx_train": 8192,
                        "n_ctx": config.n_ctx,
                        "n_embd": 576,
                        "n_params": 134515008,
                        "size": 98_000_000,
                    },
                }
            ],
        }
        props = {
            "default_generation_settings": {"params": _default_params(), "n_ctx": config.n_ctx},
            "total_slots": config.slots,
            "model_alias": alias,
            "model_path": f"/fake/{alias}.gguf",
            "modalities": {"vision": False, "audio": False},
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": True,
            "webui": False,
            "chat_template": CHAT_TEMPLATE,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "build_info": BUILD_INFO,
            "is_sleeping": False,
        }
        return cls(
            config=config,
            alias_json=_dumps(alias),
            reply_tokens=tokens,
            reply_json=tuple(_dumps(t) for t in tokens),
            repeat_tokens=repeat,
            repeat_json=tuple(_dumps(t) for t in repeat),
            reply_plain=tuple(t.strip() for t in tokens),
            models_body=_dumps(models),
            props_body=_dumps(props),
        )


def _default_params() -> dict[str, Any]:
    """A subset of the real `default_generation_settings.params` keys."""
    return {
        "n_predict": -1,
        "seed": 4294967295,
        "temperature": 0.8,
        "dynatemp_range": 0.0,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "n_keep": 0,
        "n_discard": 0,
        "ignore_eos": False,
        "stream": False,
        "n_probs": 0,
        "min_keep": 0,
        "stop": [],
    }


_PARAM_KEYS = (
    "seed",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "stream",
    "n_probs",
    "stop",
)


class _ApiError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, message: str, kind: str, **extra: Any) -> _ApiError:
    return _ApiError(status, _dumps({"error": {"code": status, "message": message, "type": kind, **extra}}))


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers={"Content-Type": JSON_CT})


def _check_alive(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client disconnected")


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _pause(request: web.BaseRequest, seconds: float) -> None:
    """Sleep, noticing a client that went away even without aiohttp's handler cancellation."""
    if seconds <= 0:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, 0.05))
        _check_alive(request)


def _timings(cache_n: int, prompt_n: int, prompt_s: float, predicted_n: int, predicted_s: float) -> bytes:
    prompt_ms = prompt_s * 1e3
    predicted_ms = predicted_s * 1e3
    return _dumps(
        {
            "cache_n": cache_n,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1e3 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
        }
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def _render_chat(messages: list[Any]) -> str:
    parts: list[str] = []
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    for message in messages:
        if not isinstance(message, dict):
            raise _error(500, "[json.exception.type_error.302] type must be object", "server_error")
        parts.append(f"<|im_start|>{message.get('role', 'user')}\n{_content_text(message.get('content'))}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


Kind = Literal["chat", "native", "text"]


@dataclass
class _Job:
    kind: Kind
    stream: bool
    include_usage: bool
    tokens: tuple[str, ...]
    limit: int
    ignore_eos: bool
    params: dict[str, Any]
    prompt: Any = None


# --------------------------------------------------------------------------------------------------
# The server


class FakeLlama:
    """One fake llama-server. `await start()` / `await stop()` (restartable on the same port)."""

    def __init__(self, config: FakeLlamaConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._prep = _Prepared.build(config or FakeLlamaConfig())
        self.host = host
        self._port = port
        self._fault = NO_FAULT
        self._fault_left: int | None = None
        self._fault_epoch = 0
        self._stats = _Stats()
        self._engine = _Engine(self._prep.config, self._stats)
        self._runner: web.AppRunner | None = None

    # --- lifecycle

    @property
    def config(self) -> FakeLlamaConfig:
        return self._prep.config

    @property
    def port(self) -> int:
        """The bound port (after the first start when it was created with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def make_app(self) -> web.Application:
        """The aiohttp app of this fake (also usable with aiohttp's own test server)."""
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        app.on_response_prepare.append(self._on_prepare)
        r = app.router
        r.add_get("/health", self._health)
        r.add_get("/v1/health", self._health)
        r.add_get("/slots", self._slots)
        r.add_get("/metrics", self._metrics)
        r.add_get("/props", self._props)
        r.add_get("/v1/models", self._models)
        r.add_get("/models", self._models)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/chat/completions", self._chat)
        r.add_post("/completion", self._native)
        r.add_post("/completions", self._native)
        r.add_post("/v1/completions", self._text_completion)
        r.add_get("/_fake/fault", self._ctl_get_fault)
        r.add_post("/_fake/fault", self._ctl_set_fault)
        r.add_delete("/_fake/fault", self._ctl_clear_fault)
        r.add_get("/_fake/stats", self._ctl_stats)
        r.add_delete("/_fake/stats", self._ctl_reset_stats)
        r.add_get("/_fake/config", self._ctl_get_config)
        r.add_post("/_fake/config", self._ctl_set_config)
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self) -> None:
        """Start serving (again): a fresh "process" with empty slots, caches and metrics, loading first."""
        if self._runner is not None:
            return
        config = self.config
        self._engine = _Engine(config, self._stats)
        self._engine.ready_at = time.monotonic() + config.load_time
        runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=config.keepalive_timeout,
            shutdown_timeout=0.05,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop like a crashed process: close the listener, abort every connection (mid-stream too)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        # A connection accepted just before the listener closed is handed to its protocol a few loop
        # turns later; wait for it so it is aborted too instead of lingering as an unclosed socket.
        for _ in range(3):
            await asyncio.sleep(0.005)
            server = runner.server
            if server is not None:
                for conn in server.connections:
                    if conn.transport is not None:
                        conn.transport.abort()
        await runner.cleanup()

    async def __aenter__(self) -> FakeLlama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- control from Python

    def set_fault(
        self,
        mode: FaultMode | Fault = "none",
        *,
        after_tokens: int | None = None,
        count: int | None = None,
        status: int = 500,
        message: str | None = None,
        paths: Iterable[str] | None = None,
    ) -> Fault:
        """Inject a fault (or pass a ready `Fault`); any change releases requests held by `hang`."""
        if isinstance(mode, Fault):
            fault = mode
        else:
            fault = Fault(
                mode=mode,
                after_tokens=after_tokens,
                count=count,
                status=status,
                message=message if message is not None else Fault.message,
                paths=tuple(paths) if paths is not None else None,
            )
        self._fault = fault
        self._fault_left = fault.count
        self._fault_epoch += 1
        return fault

    def clear_fault(self) -> None:
        self.set_fault(NO_FAULT)

    @property
    def fault(self) -> Fault:
        return self._fault

    def update_config(self, **changes: Any) -> FakeLlamaConfig:
        """Change `RUNTIME_FIELDS` (delays, reply, alias, ...) while serving; `load_time` applies at the
        next start, a request already running keeps the timing it started with."""
        bad = set(changes) - RUNTIME_FIELDS
        if bad:
            raise ValueError(f"cannot change {', '.join(sorted(bad))} at runtime")
        self._prep = _Prepared.build(replace(self.config, **changes))
        return self.config

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for tests (also `GET /_fake/stats`). Header names in the records are lower-case."""
        st = self._stats
        eng = self._engine
        return {
            "requests": dict(st.requests),
            "requests_total": st.requests_total,
            "completed": st.completed,
            "cancelled": st.cancelled,
            "faults_applied": st.faults_applied,
            "processing": eng.busy,
            "deferred": len(eng.waiters),
            "max_processing": st.max_processing,
            "max_deferred": st.max_deferred,
            "last_request": st.last.as_dict() if st.last is not None else None,
            "last_by_path": {path: rec.as_dict() for path, rec in st.last_by_path.items()},
            "fault": self._fault.as_dict(),
            "running": self.running,
            "timeline": list(st.timeline),
        }

    def reset_stats(self) -> None:
        """Zero the test counters (the server's own metrics are not touched)."""
        fresh = _Stats()
        self._stats.__dict__.update(fresh.__dict__)

    # --- plumbing

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers["Server"] = "llama.cpp"
        count = getattr(request.protocol, "_request_count", 0)
        if count >= self.config.keepalive_max:
            response.force_close()
            headers["Connection"] = "close"  # aiohttp may have chosen its headers already
        elif request.keep_alive and response.keep_alive is not False:
            timeout = self.config.keepalive_timeout
            headers["Keep-Alive"] = f"timeout={timeout:g}, max={self.config.keepalive_max}"

    def _take_fault(self, path: str) -> Fault | None:
        fault = self._fault
        if not fault.applies_to(path):
            return None
        if self._fault_left is not None:
            self._fault_left -= 1
            if self._fault_left <= 0:
                self._fault = NO_FAULT
                self._fault_left = None
        self._stats.faults_applied += 1
        return fault

    async def _hold(self, request: web.BaseRequest) -> None:
        """Hang until the fault is changed (or the connection or server goes away)."""
        epoch = self._fault_epoch
        while self._fault_epoch == epoch:
            await asyncio.sleep(0.02)
            _check_alive(request)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path.startswith(CONTROL_PREFIX):
            try:
                return cast(web.StreamResponse, await handler(request))
            except _ApiError as exc:
                return _json_response(exc.body, exc.status)
        body = await request.read() if request.body_exists else b""
        st = self._stats
        st.requests_total += 1
        st.requests[path] = st.requests.get(path, 0) + 1
        record = _RequestRecord(request.method, path, request.query_string, request.headers, body)
        st.last = record
        st.last_by_path[path] = record
        if self.config.plain_openai and path in LLAMA_ONLY_PATHS:
            return _json_response(NOT_FOUND_BODY, 404)
        if self.config.plain_openai and path == "/health":
            return web.Response(status=200)  # vLLM: ready, and nothing else said
        if time.monotonic() < self._engine.ready_at:
            return _json_response(LOADING_BODY, 503)
        fault = self._take_fault(path) if self._fault is not NO_FAULT else None
        if fault is not None:
            mode = fault.mode
            if mode == "loading":
                return _json_response(LOADING_BODY, 503)
            if mode == "error_500":
                err = _error(fault.status, fault.message, "server_error")
                return _json_response(err.body, err.status)
            if mode == "close_immediately" or (mode == "crash_mid_stream" and path not in GENERATION_PATHS):
                _abort(request)
                return web.Response()
            if mode == "hang" and (fault.after_tokens is None or path not in GENERATION_PATHS):
                await self._hold(request)
                fault = None
        _MID_STREAM_FAULT.set(fault)  # read by _run (same task); set on every request of a connection
        try:
            return cast(web.StreamResponse, await handler(request))
        except _ApiError as exc:
            return _json_response(exc.body, exc.status)

    # --- read-only endpoints

    async def _health(self, request: web.Request) -> web.StreamResponse:
        if self.config.legacy_health:
            eng = self._engine
            return _json_response(
                _dumps({"status": "ok", "slots_idle": len(eng.slots) - eng.busy, "slots_processing": eng.busy})
            )
        return _json_response(HEALTH_OK_BODY)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        return _json_response(NOT_FOUND_BODY, 404)

    async def _slots(self, request: web.Request) -> web.StreamResponse:
        eng = self._engine
        if self.config.legacy_health:
            return _json_response(NO_SLOTS_ENDPOINT_BODY, 501)
        if request.query.get("fail_on_no_slot") not in (None, "", "0", "false") and eng.busy >= len(eng.slots):
            return _json_response(NO_SLOT_BODY, 503)
        return _json_response(_dumps([s.as_json(eng.n_ctx) for s in eng.slots]))

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        eng = self._engine
        return web.Response(
            body=eng.metrics_text().encode(),
            headers={
                "Content-Type": "text/plain; version=0.0.4",
                "Process-Start-Time-Unix": str(eng.start_unix),
            },
        )

    async def _props(self, request: web.Request) -> web.StreamResponse:
        return _json_response(self._prep.props_body)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return _json_response(self._prep.models_body)

    # --- generation endpoints

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            data = json.loads(raw)
        except UnicodeDecodeError as exc:
            raise _error(500, f"[json.exception.parse_error.101] parse error: {exc}", "server_error") from None
        except json.JSONDecodeError as exc:
            if not raw.strip():
                detail = (
                    "attempting to parse an empty input; check that your input string or stream "
                    "contains the expected JSON"
                )
            else:
                last = exc.doc[max(0, exc.pos - 8) : exc.pos + 1]
                detail = f"syntax error while parsing value - invalid literal; last read: '{last}'"
            message = f"[json.exception.parse_error.101] parse error at line {exc.lineno}, column {exc.colno}: {detail}"
            raise _error(500, message, "server_error") from None
        if not isinstance(data, dict):
            raise _error(500, "[json.exception.type_error.302] type must be object", "server_error")
        return data

    @staticmethod
    def _limit(data: Mapping[str, Any], keys: Sequence[str]) -> int:
        for key in keys:
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return -1

    def _params(self, data: Mapping[str, Any], limit: int, stream: bool) -> dict[str, Any]:
        params = _default_params()
        for key in _PARAM_KEYS:
            if key in data:
                params[key] = data[key]
        params["n_predict"] = limit
        params["stream"] = stream
        return params

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        data = await self._json_body(request)
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise _error(400, "'messages' is required", "invalid_request_error")
        stream = bool(data.get("stream", False))
        options = data.get("stream_options")
        limit = self._limit(data, ("max_completion_tokens", "max_tokens", "n_predict"))
        job = _Job(
            kind="chat",
            stream=stream,
            include_usage=stream and isinstance(options, dict) and bool(options.get("include_usage")),
            tokens=tuple(tokenize(_render_chat(messages))),
            limit=limit,
            ignore_eos=bool(data.get("ignore_eos", False)),
            params=self._params(data, limit, stream),
        )
        return await self._run(request, job)

    async def _native(self, request: web.Request) -> web.StreamResponse:
        data = await self._json_body(request)
        prompt = data.get("prompt")
        if prompt is None:
            raise _error(400, '"prompt" must be provided', "invalid_request_error")
        if isinstance(prompt, str):
            tokens = tokenize(prompt)
        elif isinstance(prompt, list):  # token ids and/or strings
            tokens = []
            for part in prompt:
                if isinstance(part, int):
                    tokens.append(str(part))
                else:
                    tokens.extend(tokenize(str(part)))
        else:
            tokens = tokenize(str(prompt))
        stream = bool(data.get("stream", False))
        limit = self._limit(data, ("n_predict", "max_tokens"))
        job = _Job(
            kind="native",
            stream=stream,
            include_usage=False,
            tokens=tuple(tokens),
            limit=limit,
            ignore_eos=bool(data.get("ignore_eos", False)),
            params=self._params(data, limit, stream),
            prompt=prompt,
        )
        return await self._run(request, job)

    async def _text_completion(self, request: web.Request) -> web.StreamResponse:
        """OpenAI `/v1/completions` (not probed on the real server; shaped like its chat sibling)."""
        data = await self._json_body(request)
        prompt = data.get("prompt")
        if prompt is None:
            raise _error(400, '"prompt" must be provided', "invalid_request_error")
        stream = bool(data.get("stream", False))
        options = data.get("stream_options")
        limit = self._limit(data, ("max_tokens", "n_predict"))
        job = _Job(
            kind="text",
            stream=stream,
            include_usage=stream and isinstance(options, dict) and bool(options.get("include_usage")),
            tokens=tuple(tokenize(prompt if isinstance(prompt, str) else json.dumps(prompt))),
            limit=limit,
            ignore_eos=bool(data.get("ignore_eos", False)),
            params=self._params(data, limit, stream),
            prompt=prompt,
        )
        return await self._run(request, job)

    async def _run(self, request: web.Request, job: _Job) -> web.StreamResponse:
        """Wait for a slot, "prefill", generate; stream or answer at the end."""
        prep = self._prep
        config = prep.config
        eng = self._engine
        st = self._stats
        fault = _MID_STREAM_FAULT.get()
        crash_at = -1
        hang_at = -1
        if fault is not None:
            after = fault.after_tokens
            if fault.mode == "crash_mid_stream":
                crash_at = 2 if after is None else after
            elif fault.mode == "hang" and after is not None:
                hang_at = after
        try:
            slot, lcp = await eng.acquire(job.tokens)
        except asyncio.CancelledError:
            st.cancelled += 1
            raise
        tokens = job.tokens
        n_prompt = len(tokens)
        cache_n = min(lcp, max(n_prompt - 1, 0))
        prompt_n = n_prompt - cache_n
        eng.task_seq += 1
        slot.used = True
        slot.id_task = eng.task_seq
        slot.params = job.params
        slot.n_predict = job.limit
        slot.n_processed = prompt_n
        slot.n_cached = cache_n
        slot.n_prompt_tokens = n_prompt
        slot.n_decoded = 0
        generated = 0
        prefilled = False
        finished = False
        resp: web.StreamResponse | None = None
        t_start = time.perf_counter()
        t_first = t_start
        try:
            if n_prompt >= eng.n_ctx:
                raise _error(
                    400,
                    f"request ({n_prompt} tokens) exceeds the available context size ({eng.n_ctx} tokens), "
                    "try increasing it",
                    "exceed_context_size_error",
                    n_prompt_tokens=n_prompt,
                    n_ctx=eng.n_ctx,
                )
            await _pause(request, prompt_n * config.prefill_per_token)
            t_first = time.perf_counter()
            prefilled = True
            eng.on_prompt(prompt_n, cache_n, t_first - t_start)

            reply_len = len(prep.reply_tokens)
            limit = job.limit if job.limit >= 0 else config.max_tokens_default
            room = eng.n_ctx - n_prompt
            if job.ignore_eos:
                n_gen, finish = limit, "length"
            elif reply_len < limit:
                n_gen, finish = reply_len, "stop"
            else:
                n_gen, finish = limit, "length"
            if n_gen > room:
                n_gen, finish = room, "length"

            created = int(time.time())
            stream = job.stream
            kind = job.kind
            openai_only = config.plain_openai
            if kind == "chat":
                cid = "chatcmpl-" + secrets.token_hex(16)
                envelope = (
                    b'],"created":%d,"id":"%s","model":%s,"system_fingerprint":"%s",'
                    b'"object":"chat.completion.chunk"' % (created, cid.encode(), prep.alias_json, BUILD_INFO.encode())
                )
                chunk_envelope = envelope + b',"usage":null' if openai_only and job.include_usage else envelope
                pre = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":'
                post = b"}}" + chunk_envelope + b"}\n\n"
                first_extra = (
                    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
                    b'"content":null}}' + chunk_envelope + b"}\n\n"
                )
            elif kind == "text":
                cid = "cmpl-" + secrets.token_hex(16)
                envelope = (
                    b'],"created":%d,"model":%s,"system_fingerprint":"%s","object":"text_completion",'
                    b'"id":"%s"' % (created, prep.alias_json, BUILD_INFO.encode(), cid.encode())
                )
                chunk_envelope = envelope + b',"usage":null' if openai_only and job.include_usage else envelope
                pre = b'data: {"choices":[{"text":'
                post = b',"index":0,"logprobs":null,"finish_reason":null}' + chunk_envelope + b"}\n\n"
                first_extra = b""
            else:
                cid = ""
                envelope = chunk_envelope = b""
                pre = post = first_extra = b""
            native_tpl = (
                b'data: {"index":0,"content":%s,"tokens":[%d],"stop":false,"id_slot":-1,'
                b'"tokens_predicted":%d,"tokens_evaluated":%d}\n\n'
            )
            reply_json = prep.reply_json
            repeat_json = prep.repeat_json
            token_delay = config.token_delay
            slowdown = config.batch_slowdown

            for i in range(n_gen):
                if i:
                    if token_delay > 0:
                        await _pause(request, token_delay * (1.0 + slowdown * (eng.busy - 1)))
                    elif resp is not None and i % 64 == 0:
                        await asyncio.sleep(0)  # let others run on a long instant stream
                if i == crash_at:
                    _abort(request)
                    return resp if resp is not None else web.Response()
                if i == hang_at:
                    await self._hold(request)
                generated = i + 1
                slot.n_decoded = generated
                slot.n_prompt_tokens = n_prompt + generated
                if stream:
                    tok = reply_json[i] if i < reply_len else repeat_json[i % reply_len]
                    if kind == "native":
                        chunk = native_tpl % (tok, 1000 + i % reply_len, generated, n_prompt)
                    else:
                        chunk = pre + tok + post
                    if resp is None:
                        resp = web.StreamResponse(headers=SSE_HEADERS)
                        await resp.prepare(request)
                        chunk = first_extra + chunk
                    await resp.write(chunk)
            if crash_at >= 0:  # after_tokens >= the tokens generated: crash before the finish chunk
                _abort(request)
                return resp if resp is not None else web.Response()
            if hang_at >= n_gen:
                await self._hold(request)
            t_end = time.perf_counter()
            timings = _timings(cache_n, prompt_n, t_first - t_start, generated, t_end - t_first)
            with_timings = b"" if openai_only else b',"timings":' + timings
            usage = (
                b'{"completion_tokens":%d,"prompt_tokens":%d,"total_tokens":%d,'
                b'"prompt_tokens_details":{"cached_tokens":%d}}' % (generated, n_prompt, generated + n_prompt, cache_n)
            )
            text = "".join(prep.reply_tokens[:generated]) + "".join(
                prep.repeat_tokens[i % reply_len] for i in range(reply_len, generated)
            )
            if stream:
                if resp is None:
                    resp = web.StreamResponse(headers=SSE_HEADERS)
                    await resp.prepare(request)
                    tail = first_extra
                else:
                    tail = b""
                if kind == "native":
                    tail += (
                        b"data: " + self._native_final(job, text, slot, generated, cache_n, finish, timings) + b"\n\n"
                    )
                else:
                    if kind == "chat":
                        finish_choice = b'data: {"choices":[{"finish_reason":"%s","index":0,"delta":{}}' % (
                            finish.encode()
                        )
                    else:
                        finish_choice = (
                            b'data: {"choices":[{"text":"","index":0,"logprobs":null,'
                            b'"finish_reason":"%s"}' % finish.encode()
                        )
                    if job.include_usage:
                        tail += finish_choice + chunk_envelope + b"}\n\n"
                        tail += b'data: {"choices":[' + envelope + b',"usage":' + usage + with_timings + b"}\n\n"
                    else:
                        tail += finish_choice + envelope + with_timings + b"}\n\n"
                    tail += DONE
                await resp.write(tail)
                await resp.write_eof()
                finished = True
                return resp
            if kind == "chat":
                body = (
                    b'{"choices":[{"finish_reason":"%s","index":0,"message":{"role":"assistant","content":%s}}],'
                    b'"created":%d,"model":%s,"system_fingerprint":"%s","object":"chat.completion",'
                    b'"usage":%s,"id":"%s"%s}'
                    % (
                        finish.encode(),
                        _dumps(text),
                        created,
                        prep.alias_json,
                        BUILD_INFO.encode(),
                        usage,
                        cid.encode(),
                        with_timings,
                    )
                )
            elif kind == "text":
                body = (
                    b'{"choices":[{"text":%s,"index":0,"logprobs":null,"finish_reason":"%s"}],'
                    b'"created":%d,"model":%s,"system_fingerprint":"%s","object":"text_completion",'
                    b'"usage":%s,"id":"%s"%s}'
                    % (
                        _dumps(text),
                        finish.encode(),
                        created,
                        prep.alias_json,
                        BUILD_INFO.encode(),
                        usage,
                        cid.encode(),
                        with_timings,
                    )
                )
            else:
                body = self._native_final(job, text, slot, generated, cache_n, finish, timings)
            _check_alive(request)
            finished = True
            return _json_response(body)
        except asyncio.CancelledError:
            st.cancelled += 1
            raise
        except ConnectionError:
            st.cancelled += 1
            return resp if resp is not None else web.Response()
        finally:
            if finished:
                st.completed += 1
            if prefilled:  # the slot's KV now holds the prompt and all but the last generated token
                eng.on_prediction(generated, time.perf_counter() - t_first if generated else 0.0, n_prompt + generated)
                plain = prep.reply_plain
                slot.cache = tokens + tuple(plain[i % len(plain)] for i in range(generated - 1))
            eng.release(slot)

    def _native_final(
        self, job: _Job, text: str, slot: _Slot, generated: int, cache_n: int, finish: str, timings: bytes
    ) -> bytes:
        prep = self._prep
        body = {
            "index": 0,
            "content": "" if job.stream else text,
            "tokens": [],
            "id_slot": slot.id,
            "stop": True,
            "model": prep.config.alias,
            "tokens_predicted": generated,
            "tokens_evaluated": len(job.tokens),
            "generation_settings": job.params,
            "prompt": job.prompt if isinstance(job.prompt, str) else json.dumps(job.prompt),
            "has_new_line": "\n" in text,
            "truncated": False,
            "stop_type": "eos" if finish == "stop" else "limit",
            "stopping_word": "",
            "tokens_cached": len(job.tokens) + max(generated - 1, 0),
        }
        return _dumps(body)[:-1] + b',"timings":' + timings + b"}"

    # --- control endpoints

    async def _ctl_get_fault(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_dumps({"fault": self._fault.as_dict(), "remaining": self._fault_left}))

    async def _ctl_set_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            data = json.loads(await request.read())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            unknown = set(data) - {f.name for f in fields(Fault)}
            if unknown:
                raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
            paths = data.get("paths")
            if isinstance(paths, str):
                paths = [paths]
            fault = Fault(
                mode=data.get("mode", "none"),
                after_tokens=data.get("after_tokens"),
                count=data.get("count"),
                status=int(data.get("status", 500)),
                message=str(data.get("message", Fault.message)),
                paths=tuple(paths) if paths is not None else None,
            )
        except (ValueError, TypeError) as exc:
            raise _error(400, str(exc), "invalid_request_error") from None
        self.set_fault(fault)
        return _json_response(_dumps({"fault": fault.as_dict(), "remaining": self._fault_left}))

    async def _ctl_clear_fault(self, request: web.Request) -> web.StreamResponse:
        self.clear_fault()
        return _json_response(_dumps({"fault": self._fault.as_dict(), "remaining": None}))

    async def _ctl_stats(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_dumps(self.stats))

    async def _ctl_reset_stats(self, request: web.Request) -> web.StreamResponse:
        self.reset_stats()
        return _json_response(_dumps(self.stats))

    async def _ctl_get_config(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_dumps(asdict(self.config)))

    async def _ctl_set_config(self, request: web.Request) -> web.StreamResponse:
        try:
            data = json.loads(await request.read())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            self.update_config(**data)
        except (ValueError, TypeError) as exc:
            raise _error(400, str(exc), "invalid_request_error") from None
        return _json_response(_dumps(asdict(self.config)))


# --------------------------------------------------------------------------------------------------
# Helpers to run it


@contextlib.asynccontextmanager
async def run_fake_llama(
    config: FakeLlamaConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FakeLlama]:
    """Serve one fake on `host` (a free port unless given) for the duration of the block."""
    fake = FakeLlama(config, host=host, port=port)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@contextlib.asynccontextmanager
async def run_fake_fleet(
    n: int, config: FakeLlamaConfig | Sequence[FakeLlamaConfig] | None = None, *, host: str = "127.0.0.1"
) -> AsyncIterator[list[FakeLlama]]:
    """Serve `n` fakes on free ports (one config for all, or one per server)."""
    configs = list(config) if isinstance(config, Sequence) else [config or FakeLlamaConfig()] * n
    if len(configs) != n:
        raise ValueError("give one config, or exactly n of them")
    async with contextlib.AsyncExitStack() as stack:
        fakes = [await stack.enter_async_context(run_fake_llama(c, host=host)) for c in configs]
        yield fakes


# --------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = FakeLlamaConfig()
    p = argparse.ArgumentParser(
        prog="python -m llmbalancer.testing.fake_llama",
        description="A fake llama.cpp llama-server (for tests and benchmarks).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port (printed on start)")
    p.add_argument("--slots", type=int, default=defaults.slots)
    p.add_argument("--alias", default=defaults.alias)
    p.add_argument("--token-delay", type=float, default=defaults.token_delay, help="seconds between tokens")
    p.add_argument(
        "--prefill-per-token", type=float, default=defaults.prefill_per_token, help="seconds per uncached prompt token"
    )
    p.add_argument(
        "--load-time", type=float, default=defaults.load_time, help="seconds answering 503 Loading model after start"
    )
    p.add_argument("--reply", default=defaults.reply)
    p.add_argument("--max-tokens-default", type=int, default=defaults.max_tokens_default)
    p.add_argument("--n-ctx", type=int, default=defaults.n_ctx, help="context per slot")
    p.add_argument("--keepalive-timeout", type=float, default=defaults.keepalive_timeout)
    p.add_argument(
        "--batch-slowdown", type=float, default=defaults.batch_slowdown,
        help="k in token_delay * (1 + k * (busy slots - 1))",
    )
    p.add_argument("--record-timeline", action="store_true", help="keep (time, busy, deferred) for /_fake/stats")
    p.add_argument("--plain-openai", action="store_true", help="act as a plain OpenAI-compatible server (no timings)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    config = FakeLlamaConfig(
        slots=args.slots,
        alias=args.alias,
        token_delay=args.token_delay,
        prefill_per_token=args.prefill_per_token,
        load_time=args.load_time,
        reply=args.reply,
        max_tokens_default=args.max_tokens_default,
        n_ctx=args.n_ctx,
        keepalive_timeout=args.keepalive_timeout,
        batch_slowdown=args.batch_slowdown,
        record_timeline=args.record_timeline,
        plain_openai=args.plain_openai,
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    async with run_fake_llama(config, host=args.host, port=args.port) as fake:
        print(f"fake llama-server listening on {fake.url}", flush=True)
        await done.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
