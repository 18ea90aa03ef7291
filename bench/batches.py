"""Batch benchmark: a 2,000-line batch on a simulated fleet, alone and under interactive load.

The fleet is the project's fake llama-server (``llmbalancer/testing/fake_llama``), one process per server
(4 servers x 8 slots), restarted for every run; ``SIM`` is the scheduling benchmark's speed model (prefill
per uncached token, decode slowing as more slots share the batch). In front of it, ``llmbalancer serve``
with its defaults (``batch.max_in_flight`` null: batch lines take all but one slot of each server).

1. **Alone**: upload a 2,000-line ``/v1/chat/completions`` batch, create it, poll it to ``completed``.
   Slot utilisation while it runs, from the fakes' busy timelines (first line start to last line end),
   of all slots and of the slots open to batch work; lines/s against the fleet's capacity (every slot
   busy, or every open slot busy: ``capacity``). Run again with ``batch.max_in_flight`` = slots (no slot
   kept back) to show what the runner fills when allowed.
2. **Under interactive load at 50 % of capacity**: streamed chats arriving as a Poisson process (seeded),
   ``--window`` seconds, on a fresh fleet without a batch and on one with the same batch running; time to
   first token (client side) p50/p99 of each, interleaved over ``--rounds``, and the batch's lines/s
   during the window.

    python bench/batches.py                    # ~6 min; writes bench/RESULTS.md's "batches" section
    python bench/batches.py --window 20 --rounds 1 --lines 600 --no-write   # a smoke run

The script installs nothing (the fake and llmbalancer come from this checkout); every process it starts
runs in its own session and is stopped (SIGTERM, then SIGKILL) whatever the outcome; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import fleet
import peers
import results
import scheduling
import yaml

SERVERS, SLOTS = 4, 8
SIM = scheduling.SIM
BATCH_WORDS, BATCH_TOKENS = 40, 16  # one batch line: prompt words (tokens, to the fake), generated tokens
CHAT_WORDS, CHAT_TOKENS = 120, 32  # one interactive request
CHAT = "/v1/chat/completions"
_WORDS = ("alpha", "bravo", "delta", "echo", "kilo", "lima", "mike", "oscar", "papa", "romeo", "sierra", "tango")


def request_seconds(words: int, tokens: int, busy: int) -> float:
    """A request's slot time on a server with ``busy`` slots busy (no prompt cache: every prompt is new)."""
    return words * SIM.prefill_per_token + (tokens - 1) * SIM.token_delay * (1 + SIM.batch_slowdown * (busy - 1))


def capacity(words: int, tokens: int, busy: int) -> float:
    """Requests/s the fleet completes with ``busy`` slots of each server busy."""
    return SERVERS * busy / request_seconds(words, tokens, busy)


def _prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) + str(rng.randint(0, 999)) for _ in range(n))


def batch_file(lines: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = io.StringIO()
    for i in range(lines):
        body = {"model": fleet.MODEL, "messages": [{"role": "user", "content": _prompt(rng, BATCH_WORDS)}],
                "max_tokens": BATCH_TOKENS, "ignore_eos": True}
        out.write(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": CHAT, "body": body}) + "\n")
    return out.getvalue().encode()


def arrivals(rate: float, window: float, seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate)
    while t < window:
        out.append((t, _prompt(rng, CHAT_WORDS)))
        t += rng.expovariate(rate)
    return out


# --- the processes ------------------------------------------------------------------------------


def start(procs: peers.Processes, workdir: Path, max_in_flight: int | None) -> tuple[str, list[int]]:
    ports = fleet.start_fleet(procs, [fleet.ServerSpec(SLOTS, 1.0)] * SERVERS, SIM)
    port = peers.free_port()
    config = workdir / f"balancer-{port}.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port},
        "backends": [f"http://127.0.0.1:{p}=s{i}" for i, p in enumerate(ports)],
        "batch": {"dir": str(workdir / f"data-{port}"), "max_in_flight": max_in_flight},
        "logging": {"format": "json"},
    }))
    process = procs.start("llmbalancer", [sys.executable, "-m", "llmbalancer", "serve", "--config", str(config)], None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llmbalancer exited:\n{procs.log_tail('llmbalancer')}")
        try:
            with urllib.request.urlopen(url + "/llmhealth-snapshot", timeout=2) as reply:
                found = json.loads(reply.read())["backends"]
            if len(found) == SERVERS and all(b["state"] == "healthy" and b["slots_total"] for b in found):
                return url, ports
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"backends not healthy within 30 s:\n{procs.log_tail('llmbalancer')}")


async def create_batch(http: aiohttp.ClientSession, url: str, data: bytes) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", io.BytesIO(data), filename="bench.jsonl")
    async with http.post(url + "/v1/files", data=form) as reply:
        file_id = (await reply.json())["id"]
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    async with http.post(url + "/v1/batches", json=body) as reply:
        return str((await reply.json())["id"])


async def batch_state(http: aiohttp.ClientSession, url: str, batch_id: str) -> dict[str, object]:
    async with http.get(f"{url}/v1/batches/{batch_id}") as reply:
        result: dict[str, object] = await reply.json()
        return result


def _done(batch: dict[str, object]) -> int:
    counts = batch["request_counts"]
    assert isinstance(counts, dict)
    return int(counts["completed"]) + int(counts["failed"])


# --- 1. alone -----------------------------------------------------------------------------------


@dataclass
class Alone:
    max_in_flight: int | None
    seconds: float
    lines_per_s: float
    busy_all: float
    busy_open: float
    open_slots: int


async def run_alone(workdir: Path, lines: int, max_in_flight: int | None) -> Alone:
    procs = peers.Processes(workdir)
    try:
        url, ports = start(procs, workdir, max_in_flight)
        async with aiohttp.ClientSession() as http:
            batch_id = await create_batch(http, url, batch_file(lines, seed=1))
            deadline = time.monotonic() + 600
            while (state := await batch_state(http, url, batch_id))["status"] != "completed":
                if time.monotonic() > deadline or state["status"] in ("failed", "expired", "cancelled"):
                    raise RuntimeError(f"batch did not complete: {state}")
                await asyncio.sleep(0.5)
        timelines = [fleet.fake_stats(p)["timeline"] for p in ports]
    finally:
        procs.stop_all()
    events = [event for timeline in timelines for event in timeline]  # type: ignore[union-attr]
    begin = min(t for t, busy, _ in events if busy > 0)
    end = max(t for t, _, _ in events)
    share = scheduling.busy_share(timelines, [SLOTS] * SERVERS, begin, end)  # type: ignore[arg-type]
    per_server = SLOTS - 1 if max_in_flight is None else min(SLOTS, max_in_flight)
    return Alone(max_in_flight, end - begin, lines / (end - begin), share, share * SLOTS / per_server,
                 per_server * SERVERS)


# --- 2. under interactive load ------------------------------------------------------------------


@dataclass
class Loaded:
    with_batch: bool
    ttft: list[float]
    errors: int
    batch_lines_per_s: float | None


async def _chat(http: aiohttp.ClientSession, url: str, at: float, prompt: str, t0: float) -> float | None:
    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
    body = {"model": fleet.MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": CHAT_TOKENS, "ignore_eos": True}
    started = time.monotonic()
    ttft = None
    try:
        async with http.post(url + CHAT, json=body) as reply:
            if reply.status != 200:
                await reply.read()
                return None
            async for raw in reply.content:
                if ttft is None and raw.startswith(b"data: {") and b'"content"' in raw:
                    ttft = time.monotonic() - started
    except (aiohttp.ClientError, TimeoutError):
        return None
    return ttft


async def run_loaded(workdir: Path, lines: int, rate: float, window: float, seed: int, with_batch: bool) -> Loaded:
    procs = peers.Processes(workdir)
    try:
        url, _ = start(procs, workdir, None)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
            batch_id = None
            if with_batch:
                batch_id = await create_batch(http, url, batch_file(lines, seed=1))
                deadline = time.monotonic() + 60
                while _done(await batch_state(http, url, batch_id)) < 50:  # the batch is filling the fleet
                    if time.monotonic() > deadline:
                        raise RuntimeError("the batch did not start")
                    await asyncio.sleep(0.2)
                before = _done(await batch_state(http, url, batch_id))
            t0 = time.monotonic()
            ttfts = await asyncio.gather(*(_chat(http, url, at, prompt, t0) for at, prompt in
                                           arrivals(rate, window, seed)))
            elapsed = time.monotonic() - t0
            progress = None
            if batch_id is not None:
                state = await batch_state(http, url, batch_id)
                if state["status"] != "in_progress":
                    print(f"  note: the batch was {state['status']} at the window's end", flush=True)
                progress = (_done(state) - before) / elapsed
    finally:
        procs.stop_all()
    return Loaded(with_batch, [t for t in ttfts if t is not None], sum(t is None for t in ttfts), progress)


# --- the report ---------------------------------------------------------------------------------


def report(alone: list[Alone], loaded: list[Loaded], lines: int, rate: float, window: float, rounds: int) -> str:
    full = capacity(BATCH_WORDS, BATCH_TOKENS, SLOTS)
    open_cap = capacity(BATCH_WORDS, BATCH_TOKENS, SLOTS - 1)
    out = [
        f"Fleet: {SERVERS} fake llama-servers x {SLOTS} slots, token_delay {SIM.token_delay * 1e3:g} ms, "
        f"prefill {SIM.prefill_per_token * 1e3:g} ms per uncached token, decode step "
        f"x(1 + {SIM.batch_slowdown:g} x (busy - 1)). Batch: {lines} lines, {BATCH_WORDS}-word prompts, "
        f"{BATCH_TOKENS} tokens each (ignore_eos). Fleet capacity for such lines: {full:.1f} lines/s with every "
        f"slot busy, {open_cap:.1f} lines/s with all but one slot of each server busy (what the default leaves "
        "batch work).",
        "",
        "**1. The batch alone** (slots busy from the fakes' timelines, first line start to last line end):",
        "",
        "| batch.max_in_flight | run s | lines/s | vs capacity (all slots) | slots busy, of all "
        "| of the slots open to batches |",
        "|---|---|---|---|---|---|",
    ]
    for a in alone:
        name = "null (default: all but one)" if a.max_in_flight is None else str(a.max_in_flight)
        out.append(f"| {name} | {a.seconds:.1f} | {a.lines_per_s:.1f} | {a.lines_per_s / full:.0%} | "
                   f"{a.busy_all:.1%} | {a.busy_open:.1%} ({a.open_slots}) |")
    without = [t for run in loaded if not run.with_batch for t in run.ttft]
    with_ = [t for run in loaded if run.with_batch for t in run.ttft]
    progress = [run.batch_lines_per_s for run in loaded if run.batch_lines_per_s is not None]
    p99_without, p99_with = scheduling.pct(without, 0.99), scheduling.pct(with_, 0.99)
    chat_cap = capacity(CHAT_WORDS, CHAT_TOKENS, SLOTS)
    out += [
        "",
        f"**2. Interactive load at 50 % of capacity**: streamed chats ({CHAT_WORDS}-word prompts, {CHAT_TOKENS} "
        f"tokens, ignore_eos) arriving as a Poisson process at {rate:.2f}/s (capacity {chat_cap:.2f}/s with every "
        f"slot busy), {window:g} s windows, {rounds} round(s) of each, interleaved, a fresh fleet per run; TTFT = "
        "sending to the first content token, client side, pooled over the rounds:",
        "",
        "| | requests | errors | TTFT p50 | TTFT p99 | batch lines/s meanwhile |",
        "|---|---|---|---|---|---|",
        f"| without a batch | {len(without)} | {sum(r.errors for r in loaded if not r.with_batch)} | "
        f"{scheduling.pct(without, 0.5) * 1e3:.0f} ms | {p99_without * 1e3:.0f} ms | - |",
        f"| with the batch running | {len(with_)} | {sum(r.errors for r in loaded if r.with_batch)} | "
        f"{scheduling.pct(with_, 0.5) * 1e3:.0f} ms | {p99_with * 1e3:.0f} ms | "
        f"{sum(progress) / max(1, len(progress)):.1f} |",
        "",
        f"p99 TTFT with the batch / without: **{p99_with / p99_without:.2f}x** (target <= 1.2x).",
        "",
        *verdict(alone, p99_with / p99_without, sum(progress) / max(1, len(progress))),
    ]
    return "\n".join(out)


def verdict(alone: list[Alone], ratio: float, progress: float) -> list[str]:
    default = next(a for a in alone if a.max_in_flight is None)
    unlimited = [a for a in alone if a.max_in_flight is not None]
    ceiling = (SLOTS - 1) / SLOTS
    full = capacity(BATCH_WORDS, BATCH_TOKENS, SLOTS)
    met = "met" if default.busy_open >= 0.9 else "missed"
    lines = [
        "Targets:",
        f"- slot utilisation while the batch runs alone >= 90 %: {met} on the slots open to batch work "
        f"({default.busy_open:.1%}); of all slots {default.busy_all:.1%}, as the default keeps one of each server's "
        f"{SLOTS} free for users (a ceiling of {ceiling:.1%} here)"
        + (f"; with `batch.max_in_flight: {unlimited[0].max_in_flight}` {unlimited[0].busy_all:.1%} of all slots."
           if unlimited else "."),
        f"- lines/s alone: {default.lines_per_s:.1f}, {default.lines_per_s / full:.0%} of the fleet's capacity "
        "with every slot busy.",
        f"- interactive p99 TTFT with the batch <= 1.2x without: {'met' if ratio <= 1.2 else 'missed'} "
        f"({ratio:.2f}x); the batch went on at {progress:.1f} lines/s "
        f"({progress / default.lines_per_s:.0%} of its pace alone) while users came.",
    ]
    return lines


async def main_async(args: argparse.Namespace) -> str:
    rate = 0.5 * capacity(CHAT_WORDS, CHAT_TOKENS, SLOTS)
    with tempfile.TemporaryDirectory(prefix="batchbench-") as tmp:
        workdir = Path(tmp)
        alone = []
        for max_in_flight in (None, SLOTS):
            alone.append(await run_alone(workdir, args.lines, max_in_flight))
            print(f"alone, max_in_flight {max_in_flight}: {alone[-1]}", flush=True)
        loaded = []
        for round_ in range(args.rounds):
            for with_batch in (False, True):
                run = await run_loaded(workdir, args.lines, rate, args.window, 100 + round_, with_batch)
                loaded.append(run)
                print(f"loaded, batch {with_batch}: {len(run.ttft)} requests, p99 "
                      f"{scheduling.pct(run.ttft, 0.99) * 1e3:.0f} ms, batch {run.batch_lines_per_s}", flush=True)
    return report(alone, loaded, args.lines, rate, args.window, args.rounds)


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of interactive arrivals per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    header = results.machine()
    body = asyncio.run(main_async(args))
    command = "python bench/batches.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"## Batches\n\n`{command.strip()}` — {started:%Y-%m-%d %H:%M} UTC, {header}.\n\n{body}"
    print("\n" + text)
    if not args.no_write:
        results.write_section("batches", text)
        print(f"\nwritten to {results.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
