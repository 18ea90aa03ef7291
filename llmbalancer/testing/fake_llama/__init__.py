"""A fake llama.cpp `llama-server`, faithful on the wire, with faults on cue.

This is the one fake backend of the project: tests and benchmarks use it for what the real
llama-server cannot show on cue (a crash mid-stream, a hang, a 500, a slow start, a fleet of slow
servers, thousands of requests per second). Its API and behaviour follow the probed real server as
described in the project's `docs/llama-server-api.md` (status codes, JSON shapes, `Server: llama.cpp`,
`Keep-Alive: timeout=5, max=100`, SSE framing, 503 `Loading model`, /slots, /metrics, /props,
/v1/models, native /completion). Where it simplifies, the docstrings say so.

What it models, and where:

* **Slots** (`FakeLlamaConfig.slots`), each with a prompt cache, and a FIFO of deferred requests beyond
  them, shown as `requests_processing` / `requests_deferred` in /metrics; the host-RAM prompt cache and
  slot choice by similarity, as llama.cpp's `get_available_slot` (`engine`, `metrics`).
* **Tokens**: whitespace-separated words, `<|special|>` tokens apart; chat requests rendered with the
  SmolLM2 chat template (`prompt`).
* **Timing**: prefill per uncached token, decode slowing as slots share the batch (`timing`); with
  `record_timeline`, (monotonic time, busy slots, deferred) at every change, shown as `timeline` in
  the stats, so a benchmark can tell when requests waited here while another server had a free slot
  (`time.monotonic` is system-wide, so timelines of several processes align).
* **The reply** is `FakeLlamaConfig.reply`, one token per word (`prepared`), generated and framed per
  request kind (`jobs`, `generation`, `framing`).
* **plain_openai** makes it a plain OpenAI-compatible (vLLM-like) server instead (`config`); the
  Ollama mode is `llmbalancer.testing.fake_ollama`.
* **Faults** (`FakeLlama.set_fault`, or `POST /_fake/fault`; modes in `faults`), and the control API
  under `/_fake/` (`control`), never faulted, never 503.

The HTTP surface is `endpoints` (llama-server's endpoints) and `server` (`FakeLlama`: lifecycle,
middleware, headers); `state` is what they share, with the test counters of `stats`; `wire` holds the
constant bodies and headers.

Run in-process with `async with run_fake_llama(FakeLlamaConfig(...)) as fake:` (or `run_fake_fleet`),
or as a process: `python -m llmbalancer.testing.fake_llama --port P [...]` (`cli`; prints
`fake llama-server listening on http://HOST:PORT` once it serves, exits 0 on SIGTERM/SIGINT).
"""

from llmbalancer.testing.fake_llama.cli import main
from llmbalancer.testing.fake_llama.config import FakeLlamaConfig
from llmbalancer.testing.fake_llama.faults import FAULT_MODES, GENERATION_PATHS, Fault, FaultMode
from llmbalancer.testing.fake_llama.prompt import tokenize
from llmbalancer.testing.fake_llama.server import FakeLlama, run_fake_fleet, run_fake_llama

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
