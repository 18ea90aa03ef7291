"""llama-server's `/metrics`: its counters, the gauges windowed since the previous scrape, and the
Prometheus text (names, help, order as in docs/llama-server-api.md, "GET /metrics").

Pure bookkeeping: the engine reports prompts and predictions, and passes the busy slots it has.
"""

from __future__ import annotations


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


class Metrics:
    """One server process's metrics; a scrape (`text`) resets the windowed gauges, as on the real server."""

    def __init__(self) -> None:
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

    def on_prompt(self, prompt_n: int, cache_n: int, seconds: float, busy: int) -> None:
        """A prompt evaluated (`prompt_n` uncached tokens) while `busy` slots were busy."""
        self.prompt_tokens_total += prompt_n
        self.prompt_tokens_cached_total += cache_n
        self.prompt_seconds_total += seconds
        self.w_prompt_tokens += prompt_n
        self.w_prompt_seconds += seconds
        if prompt_n:
            self.n_decode_total += 1
            self.w_decodes += 1
            self.w_busy_slots += busy

    def on_prediction(self, n_decoded: int, seconds: float, n_tokens: int, busy: int) -> None:
        """A generation ended after `n_decoded` tokens, its sequence `n_tokens` long."""
        self.tokens_predicted_total += n_decoded
        self.tokens_predicted_seconds_total += seconds
        self.w_predicted_tokens += n_decoded
        self.w_predicted_seconds += seconds
        decodes = max(n_decoded - 1, 0)  # the first token comes from the prompt's decode
        self.n_decode_total += decodes
        self.w_decodes += decodes
        self.w_busy_slots += decodes * max(busy, 1)
        self.n_tokens_max = max(self.n_tokens_max, n_tokens)

    def _rows(self, processing: int, deferred: int) -> list[tuple[str, str, str, float]]:
        return [
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
                _rate(self.w_prompt_tokens, self.w_prompt_seconds),
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s.",
                _rate(self.w_predicted_tokens, self.w_predicted_seconds),
            ),
            ("requests_processing", "gauge", "Number of requests processing.", processing),
            ("requests_deferred", "gauge", "Number of requests deferred.", deferred),
            (
                "n_busy_slots_per_decode",
                "gauge",
                "Average number of busy slots per llama_decode() call",
                self.w_busy_slots / self.w_decodes if self.w_decodes else 0.0,
            ),
        ]

    def text(self, processing: int, deferred: int) -> str:
        """The Prometheus exposition of a scrape, which starts a new window."""
        rows = self._rows(processing, deferred)
        self.w_prompt_tokens = self.w_predicted_tokens = self.w_decodes = self.w_busy_slots = 0
        self.w_prompt_seconds = self.w_predicted_seconds = 0.0
        lines: list[str] = []
        for name, kind, help_text, value in rows:
            lines.append(f"# HELP llamacpp:{name} {help_text}")
            lines.append(f"# TYPE llamacpp:{name} {kind}")
            lines.append(f"llamacpp:{name} {value:g}" if isinstance(value, float) else f"llamacpp:{name} {value}")
        return "\n".join(lines) + "\n"
