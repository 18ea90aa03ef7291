"""The command line: `python -m llmbalancer.testing.fake_llama --port P [...]` serves one fake until
SIGTERM or SIGINT (exit 0), printing `fake llama-server listening on http://HOST:PORT` once it serves."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

from llmbalancer.testing.fake_llama.config import FakeLlamaConfig
from llmbalancer.testing.fake_llama.server import run_fake_llama


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


def _config(args: argparse.Namespace) -> FakeLlamaConfig:
    return FakeLlamaConfig(
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


async def _serve(args: argparse.Namespace) -> None:
    config = _config(args)
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
