"""Fair share benchmark: one client key floods the fleet at 3x its capacity while another sends at 10 % of
it; the light key's time to first token with fair share against plain arrival order. And what keys cost a
request (``key_cost.py``).

The fleet is the project's fake llama-server, one process per server (``fleet.start_fleet``), started fresh
for every run: ``--servers`` x ``--slots`` slots, each request a stream of ``MAX_TOKENS`` tokens at
``TOKEN_DELAY`` s each, so the fleet's capacity is slots / (MAX_TOKENS x TOKEN_DELAY) requests per second. In
front of it, ``python -m llmbalancer serve`` with a queue deep and patient enough to hold the flood
(``queue.max_size`` 100000, ``queue.timeout`` ``--queue-timeout``). Arrivals are Poisson, seeded, over
``--window`` seconds; the light key's requests are all waited for (each ends within the queue timeout), then
the heavy key's still waiting are cut off. Three ways of running the same arrivals:

- **fair share (keys)**: two keys of equal priority: the light key's requests are taken between the heavy
  key's (``scheduling/fairness.py``);
- **arrival order**: no keys, both clients from 127.0.0.1: one tenant, so first come, first served;
- **fair share (addresses)**: no keys, the light client from 127.0.0.2: without keys the client's address is
  the tenant.

A light request still waiting when the queue timeout ends (504) counts at the queue timeout in its TTFT
figures, and among the timeouts.

    python bench/fairness.py                    # writes bench/RESULTS.md's fairness section (~6 min)
    python bench/fairness.py --seeds 1 --window 10 --no-write    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import fleet
import key_cost
import peers
import results

CHAT = "/v1/chat/completions"
MAX_TOKENS = 16
TOKEN_DELAY = 0.02
HEAVY_KEY, LIGHT_KEY, WATCHER = "sk-heavy-000000000000", "sk-light-000000000000", "sk-watch-000000000000"
MODES = ("fair share (keys)", "arrival order", "fair share (addresses)")


@dataclass
class Run:
    mode: str
    seed: int
    light_ttft: list[float] = field(default_factory=list)  # seconds; a timeout counts at the queue timeout
    light_timeouts: int = 0
    light_errors: int = 0
    heavy_served: int = 0  # heavy requests answered before the run was cut off
    heavy_sent: int = 0
    seconds: float = 0.0  # from the first arrival to the cut-off (the last light request's end)


def _config(workdir: Path, backends: list[int], mode: str, queue_timeout: float) -> Path:
    config: dict[str, object] = {
        "backends": [f"http://127.0.0.1:{b}=s{i}" for i, b in enumerate(backends)],
        "queue": {"max_size": 100_000, "timeout": queue_timeout},
    }
    if mode == MODES[0]:
        config["auth"] = {"keys": [
            {"name": "heavy", "key": HEAVY_KEY}, {"name": "light", "key": LIGHT_KEY},
            {"name": "watcher", "key": WATCHER, "observe": True},
        ]}
    path = workdir / "fairness.yaml"
    path.write_text(json.dumps(config))
    return path


def _wait_ready(procs: peers.Processes, process: object, url: str, backends: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        request = urllib.request.Request(url + "/llmhealth-snapshot", headers={"Authorization": f"Bearer {WATCHER}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                found = json.loads(reply.read()).get("backends", [])
            if len(found) == backends and all(b["state"] == "healthy" and b["slots_total"] for b in found):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llmbalancer not ready:\n{procs.log_tail('llmbalancer')}")


async def _request(http: aiohttp.ClientSession, url: str, key: str | None) -> tuple[int, float]:
    """(status, seconds to the first content token); status 0 for a broken stream."""
    body = {"model": fleet.MODEL, "messages": [{"role": "user", "content": "Say hi."}], "stream": True,
            "max_tokens": MAX_TOKENS, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.monotonic()
    ttft = 0.0
    async with http.post(url + CHAT, json=body, headers=headers) as reply:
        if reply.status != 200:
            await reply.read()
            return reply.status, 0.0
        async for line in reply.content:
            if line.startswith(b"data: {") and b'"content"' in line and not ttft:
                ttft = time.monotonic() - started
        return (200 if ttft else 0), ttft


async def _client(url: str, key: str | None, rate: float, window: float, seed: int, source: str) -> list[
    asyncio.Task[tuple[int, float]]
]:
    """Poisson arrivals at ``rate``/s for ``window`` s; the tasks of every request sent."""
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0, local_addr=(source, 0))
    http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
    tasks: list[asyncio.Task[tuple[int, float]]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    at = rng.expovariate(rate)
    while at < window:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        tasks.append(asyncio.create_task(_request(http, url, key)))
        at += rng.expovariate(rate)
    closing = asyncio.ensure_future(_close_when_done(http, tasks))
    _keep.add(closing)
    closing.add_done_callback(_keep.discard)
    return tasks


_keep: set[asyncio.Future[None]] = set()


async def _close_when_done(http: aiohttp.ClientSession, tasks: list[asyncio.Task[tuple[int, float]]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    await http.close()


async def _drive(url: str, mode: str, seed: int, capacity: float, window: float, queue_timeout: float) -> Run:
    run = Run(mode, seed)
    started = time.monotonic()
    keyed = mode == MODES[0]
    light_source = "127.0.0.2" if mode == MODES[2] else "127.0.0.1"
    heavy, light = await asyncio.gather(
        _client(url, HEAVY_KEY if keyed else None, 3.0 * capacity, window, seed, "127.0.0.1"),
        _client(url, LIGHT_KEY if keyed else None, 0.1 * capacity, window, seed + 1000, light_source),
    )
    for status, ttft in await asyncio.gather(*light):  # each ends within the queue timeout (504 at worst)
        if status == 200:
            run.light_ttft.append(ttft)
        elif status == 504:
            run.light_timeouts += 1
            run.light_ttft.append(queue_timeout)
        else:
            run.light_errors += 1
    run.heavy_sent = len(heavy)
    run.seconds = time.monotonic() - started
    for task in heavy:
        if task.done() and not task.cancelled() and task.exception() is None and task.result()[0] == 200:
            run.heavy_served += 1
        task.cancel()
    await asyncio.gather(*heavy, return_exceptions=True)
    await asyncio.sleep(0.2)  # the sessions close
    return run


def run_one(workdir: Path, mode: str, seed: int, args: argparse.Namespace) -> Run:
    procs = peers.Processes(workdir)
    try:
        sim = fleet.SimParams(token_delay=TOKEN_DELAY, prefill_per_token=0.0, batch_slowdown=0.0, n_ctx=4096)
        backends = fleet.start_fleet(procs, [fleet.ServerSpec(args.slots, 1.0)] * args.servers, sim)
        port = peers.free_port()
        process = procs.start("llmbalancer", [
            sys.executable, "-m", "llmbalancer", "serve", "--config", str(_config(workdir, backends, mode,
            args.queue_timeout)), "--port", str(port), "--log-format", "json",
        ], None)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(procs, process, url, len(backends))
        capacity = args.servers * args.slots / (MAX_TOKENS * TOKEN_DELAY)
        return asyncio.run(_drive(url, mode, seed, capacity, args.window, args.queue_timeout))
    finally:
        procs.stop_all()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def section(runs: list[Run], cost: key_cost.Cost, args: argparse.Namespace, machine: str, took: float) -> str:
    capacity = args.servers * args.slots / (MAX_TOKENS * TOKEN_DELAY)
    lines = [
        "## Fair share among keys (`python bench/fairness.py`)", "",
        f"{machine}, {os.getloadavg()[0]:.1f} at the end; {took / 60:.1f} min. "
        f"Fleet: {args.servers} fake llama-servers x {args.slots} slots, "
        f"{MAX_TOKENS} tokens at {TOKEN_DELAY * 1000:g} ms each per request: capacity {capacity:.1f} requests/s. "
        f"Heavy key: Poisson at 3x capacity ({3 * capacity:.1f}/s), light key at 10 % ({0.1 * capacity:.2f}/s), "
        f"for {args.window:g} s; queue.timeout {args.queue_timeout:g} s (a light request still waiting then counts "
        f"at {args.queue_timeout:g} s). Seeds {', '.join(str(s) for s in range(1, args.seeds + 1))}, pooled.", "",
        "| Queue order | light TTFT p50 s | light TTFT p99 s | light timeouts | light requests "
        "| heavy answered/s |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        ttfts = [t for r in mine for t in r.light_ttft]
        served = sum(r.heavy_served for r in mine) / sum(r.seconds for r in mine) if mine else 0.0
        lines.append(
            f"| {mode} | {pct(ttfts, 0.5):.2f} | {pct(ttfts, 0.99):.2f} | {sum(r.light_timeouts for r in mine)} | "
            f"{len(ttfts) + sum(r.light_errors for r in mine)} | {served:.1f} |"
        )
    fair = [t for r in runs if r.mode == MODES[0] for t in r.light_ttft]
    plain = [t for r in runs if r.mode == MODES[1] for t in r.light_ttft]
    if fair and plain:
        lines += ["", f"Light key's p99 TTFT: {pct(fair, 0.99):.2f} s with fair share against "
                  f"{pct(plain, 0.99):.2f} s in arrival order ({pct(plain, 0.99) / max(pct(fair, 0.99), 1e-9):.0f}x)."]
    lines += ["", *key_cost.lines(cost), "",
              "In process: the key found by digest from an OpenAI SDK request's header lines, its model checked, "
              "its max_concurrency, rpm and tpm counted in memory, its headers made as the lean relay writes them, "
              "its request's facts re-made with the key's name and priority, its place released and tokens "
              "corrected; against the same request's facts with keys off. End to end: the balancer's own CPU "
              "time per request (user + system, its process group) under `wrk -t1 -c16` POSTing a chat "
              "completion to an instant backend (`bench/instant_backend.py`), one key with every limit set high "
              "enough never to refuse, access logging on; balancer and backend pinned to core 1, wrk to core 0."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--window", type=float, default=20.0, help="seconds of arrivals per run")
    parser.add_argument("--queue-timeout", type=float, default=30.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cost-rounds", type=int, default=5, help="end-to-end rounds (0: in process only)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    machine = results.machine()
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        for seed in range(1, args.seeds + 1):
            for mode in MODES:
                print(f"seed {seed}: {mode} ...", flush=True)
                workdir = Path(tmp) / f"{seed}-{MODES.index(mode)}"
                workdir.mkdir()
                runs.append(run_one(workdir, mode, seed, args))
        print("key cost ...", flush=True)
        costdir = Path(tmp) / "cost"
        costdir.mkdir()
        cost = key_cost.measure(costdir, args.cost_rounds)
    results.report("fairness", section(runs, cost, args, machine, time.monotonic() - started), not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
