"""How one fake llama-server behaves: `FakeLlamaConfig`, validated once, and which fields may change live."""

from __future__ import annotations

from dataclasses import dataclass


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
    # A chat request offering tools, its last message the user's, is answered with a call of the first tool
    # with these arguments (JSON text; `tools`).
    tool_arguments: str = "{}"

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
