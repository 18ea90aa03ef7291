"""Replicas benchmark: the scheduling benchmark's workload through one balancer, through two replicas sharing one
Redis, and through two independent balancers; then what the Redis round trips cost per request.

Workload, fleet and figures are the scheduling benchmark's (``bench/scheduling.py``, ``bench/workload.py``,
``bench/fleet.py``): seeded multi-turn chat sessions, the mixed fleet (4 fake llama-servers x 2 slots, two of
them 2x slower) at 80 % of its capacity, each seed played on a fresh fleet (cold caches). With two balancers,
each request goes to one of them by a hash of (session, turn): the clients' requests spread evenly, and a
session's turns land on either. Configurations:

- ``single``: one llmbalancer (what the scheduling benchmark measures);
- ``shared``: two llmbalancer replicas, ``--state redis://...`` on one redis-server (fresh per run);
- ``independent``: two llmbalancers that share nothing (for contrast: each hands out every slot).

Besides the scheduling figures, each run reads every fake's ``max_processing`` (most requests it ever ran at
once: never above its slots) and ``max_deferred`` (most it ever held waiting for a slot: 0 when no balancer
oversubscribed it), and with ``shared`` the replicas' ``refusals`` (claims another replica took first) and
``downs`` (times Redis was lost).

The cost phase (``--cost-rounds``): one fake llama-server with 64 slots and no token delay, two balancers in
front of it, one with ``--state`` and one without, loaded alternately (paired rounds, the order swapped each
round): CPU per request of the balancer's process (and of redis-server), client latency at concurrency 1 and
requests/s at concurrency 16. The difference is the cost of one admit round trip per claim and one write per
release (plus the policy's memory events and the stream reads).

    python bench/replicas.py                       # prefix, seeds 7,3,11,5,13,17, cost phase (~25 min)
    python bench/replicas.py --seeds 7 --window 20 --cost-rounds 2 --no-write   # a smoke run (~4 min)

Prerequisites: Linux, Debian's ``redis-server`` on PATH. Every process runs in its own session and is stopped
(SIGTERM, then SIGKILL) after its run, whatever the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import fleet
import peers
import results
import scheduling
import workload

CONFIGS = ["single", "shared", "independent"]
SEEDS = "7,3,11,5,13,17"  # the scheduling benchmark's verdict seeds
FLEET, LOAD = "mixed", 0.8


# --- processes ----------------------------------------------------------------------------------


def redis_server() -> str:
    for path in (os.environ.get("REDIS_SERVER", ""), "/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if path and Path(path).exists():
            return path
    raise RuntimeError("redis-server not installed (apt-get install -y redis-server)")


def start_redis(procs: peers.Processes, port: int) -> subprocess.Popen[bytes]:
    command = [redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = procs.start("redis", command, None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{procs.log_tail('redis')}")
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer within 10 s")


def snapshot(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/llmhealth-snapshot", timeout=5) as response:
        found: dict[str, Any] = json.loads(response.read())
        return found


def start_balancer(
    procs: peers.Processes, name: str, port: int, backends: list[tuple[int, str]], policy: str, state: str | None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "llmbalancer", "serve", "--port", str(port), "--policy", policy,
               "--log-format", "json", *(["--state", state] if state else [])]
    for backend_port, backend_name in backends:
        command += ["--backend", f"http://127.0.0.1:{backend_port}={backend_name}"]
    os.environ["LLMBALANCER_STATE__REPLICA"] = name  # read by the child at start (the parent never serves)
    try:
        process = procs.start(name, command, None)
    finally:
        del os.environ["LLMBALANCER_STATE__REPLICA"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{procs.log_tail(name)}")
        try:
            found = snapshot(port)
            ready = [b for b in found["backends"] if b["state"] == "healthy" and b["slots_total"]]
            store = found.get("state_store")
            if len(ready) == len(backends) and (state is None or (store and store["up"])):
                return process
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} not ready within 30 s:\n{procs.log_tail(name)}")


# --- the client: the scheduling benchmark's sessions, each request to one of the balancers ----------------


def pick(session_id: str, turn: int, count: int) -> int:
    digest = hashlib.blake2b(f"{session_id}/{turn}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % count


async def _run_session(
    http: aiohttp.ClientSession, urls: list[str], session: workload.Session, t0: float,
    outcomes: list[scheduling.Outcome],
) -> None:
    await asyncio.sleep(max(0.0, t0 + session.start_s - time.monotonic()))
    messages = [{"role": "system", "content": session.system}]
    for index, turn in enumerate(session.turns):
        messages.append({"role": "user", "content": turn.user})
        url = urls[pick(session.id, index, len(urls))]
        outcome, reply = await scheduling._one_request(http, url, session.id, messages, turn.max_tokens)
        outcomes.append(outcome)
        if not outcome.ok:
            return
        messages.append({"role": "assistant", "content": reply})
        await asyncio.sleep(turn.think_s)


async def drive(
    urls: list[str], sessions: list[workload.Session], window_s: float
) -> tuple[list[scheduling.Outcome], float, float]:
    outcomes: list[scheduling.Outcome] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(_run_session(http, urls, s, t0, outcomes)) for s in sessions]
        _, pending = await asyncio.wait(tasks, timeout=window_s + scheduling.DRAIN_CAP_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - t0
    outcomes.extend(scheduling.Outcome(ok=False, error="unfinished") for _ in pending)
    return outcomes, wall, t0


# --- one configuration --------------------------------------------------------------------------


@dataclass
class Run:
    row: scheduling.Row
    over_slots: int = 0  # max over fakes and seeds of (max_processing - slots), 0 when never above
    max_deferred: int = 0
    refusals: int = 0
    downs: int = 0
    fakes_seen: list[tuple[int, int]] = field(default_factory=list)  # (max_processing, slots) per fake


def run_config(workdir: Path, config: str, policy: str, plays: list[list[workload.Session]], window_s: float) -> Run:
    run = Run(scheduling.Row(FLEET, LOAD, f"{config} {policy}"))
    specs = scheduling.FLEETS[FLEET]
    slots = [s.slots for s in specs]
    pooled: list[scheduling.Outcome] = []
    walls = 0.0
    busy: list[float] = []
    for play, sessions in enumerate(plays):
        rundir = workdir / f"{config}-{policy.replace(':', '_')}-{play}"
        rundir.mkdir()
        procs = peers.Processes(rundir)
        try:
            backends = fleet.start_fleet(procs, specs, scheduling.SIM)
            named = [(port, f"s{i}") for i, port in enumerate(backends)]
            state = None
            if config == "shared":
                redis_port = peers.free_port()
                start_redis(procs, redis_port)
                state = f"redis://127.0.0.1:{redis_port}/0"
            count = 1 if config == "single" else 2
            ports = [peers.free_port() for _ in range(count)]
            for i, port in enumerate(ports):
                start_balancer(procs, f"replica-{i}", port, named, policy, state)
            outcomes, wall, t0 = asyncio.run(drive([f"http://127.0.0.1:{p}" for p in ports], sessions, window_s))
            pooled += outcomes
            walls += wall
            stats = [fleet.fake_stats(b) for b in backends]
            for stat, slot_count in zip(stats, slots, strict=True):
                seen = int(stat["max_processing"])  # type: ignore[call-overload]
                run.fakes_seen.append((seen, slot_count))
                run.over_slots = max(run.over_slots, seen - slot_count)
                run.max_deferred = max(run.max_deferred, int(stat["max_deferred"]))  # type: ignore[call-overload]
            timelines: list[list[list[float]]] = [s["timeline"] for s in stats]  # type: ignore[misc]
            misqueued, deferred = scheduling.misqueued_seconds(timelines, slots)
            run.row.misqueued_s += misqueued
            run.row.deferred_s += deferred
            busy.append(scheduling.busy_share(timelines, slots, t0 + window_s / 2, t0 + window_s))
            if state is not None:
                for port in ports:
                    store = snapshot(port)["state_store"]
                    run.refusals += int(store["refusals"])
                    run.downs += int(store["downs"])
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            run.row.note = f"not run: {exc}".splitlines()[0][:200]
            return run
        finally:
            procs.stop_all()
    scheduling.summarize(run.row, pooled, walls)
    run.row.busy_share = sum(busy) / len(busy)
    return run


# --- the cost of the round trips ------------------------------------------------------------------


@dataclass
class Cost:
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {"off": [], "on": []})
    redis_cpu_us: list[float] = field(default_factory=list)
    p50_ms: dict[str, list[float]] = field(default_factory=lambda: {"off": [], "on": []})
    rps: dict[str, list[float]] = field(default_factory=lambda: {"off": [], "on": []})
    errors: int = 0


async def _burst(url: str, requests: int, concurrency: int) -> tuple[list[float], float, int]:
    body = {"model": fleet.MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    latencies: list[float] = []
    errors = 0
    left = requests

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                async with http.post(url + scheduling.CHAT, json=body) as reply:
                    await reply.read()
                    errors += reply.status != 200
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return latencies, time.perf_counter() - started, errors


def cost_phase(workdir: Path, rounds: int, requests: int) -> Cost:
    cost = Cost()
    procs = peers.Processes(workdir)
    try:
        backend = peers.free_port()
        fake = procs.start("fake", [sys.executable, "-m", "llmbalancer.testing.fake_llama", "--port", str(backend),
                                    "--slots", "64", "--alias", fleet.MODEL], None)
        peers.wait_http(f"http://127.0.0.1:{backend}/health", fake, 30)
        redis_port = peers.free_port()
        redis = start_redis(procs, redis_port)
        ports = {"off": peers.free_port(), "on": peers.free_port()}
        pids = {
            "off": start_balancer(procs, "cost-off", ports["off"], [(backend, "s0")], "prefix", None).pid,
            "on": start_balancer(procs, "cost-on", ports["on"], [(backend, "s0")], "prefix",
                                 f"redis://127.0.0.1:{redis_port}/0").pid,
        }
        for target in ("off", "on"):  # warm both (connections, caches)
            asyncio.run(_burst(f"http://127.0.0.1:{ports[target]}", 200, 8))
        for index in range(rounds):
            for target in (("off", "on") if index % 2 == 0 else ("on", "off")):
                url = f"http://127.0.0.1:{ports[target]}"
                latencies, _, errors = asyncio.run(_burst(url, requests // 4, 1))
                cost.p50_ms[target].append(statistics.median(latencies) * 1000)
                cpu, redis_cpu = peers.group_cpu_seconds(pids[target]), peers.group_cpu_seconds(redis.pid)
                _, wall, more_errors = asyncio.run(_burst(url, requests, 16))
                cost.cpu_us[target].append((peers.group_cpu_seconds(pids[target]) - cpu) / requests * 1e6)
                if target == "on":
                    cost.redis_cpu_us.append((peers.group_cpu_seconds(redis.pid) - redis_cpu) / requests * 1e6)
                cost.rps[target].append(requests / wall)
                cost.errors += errors + more_errors
    finally:
        procs.stop_all()
    return cost


# --- output -------------------------------------------------------------------------------------


def verdict(runs: dict[str, Run]) -> list[str]:
    single, shared = runs.get("single"), runs.get("shared")
    if single is None or shared is None or single.row.note or shared.row.note:
        return ["- not judged: the single or shared run is missing"]
    hit = shared.row.hit_ratio / single.row.hit_ratio
    ttft = shared.row.ttft_p99 / single.row.ttft_p99
    within = shared.over_slots <= 0 and shared.max_deferred == 0
    lines = [
        f"- hit ratio, two replicas / single: {shared.row.hit_ratio:.1%} / {single.row.hit_ratio:.1%} = {hit:.3f} "
        f"(target >= 0.95): {'met' if hit >= 0.95 else 'MISSED'}",
        f"- p99 TTFT, two replicas / single: {shared.row.ttft_p99:.2f} s / {single.row.ttft_p99:.2f} s = {ttft:.2f} "
        f"(target <= 1.1): {'met' if ttft <= 1.1 else 'MISSED'}",
        f"- no backend above its slots with two replicas: max processing - slots = {shared.over_slots}, most "
        f"deferred inside a server {shared.max_deferred}: {'met' if within else 'MISSED'}",
        f"- errors with two replicas: {shared.row.errors}: {'met' if shared.row.errors == 0 else 'MISSED'}",
    ]
    independent = runs.get("independent")
    if independent is not None and not independent.row.note:
        lines.append(
            f"- for contrast, two independent balancers: hit ratio {independent.row.hit_ratio:.1%}, p99 TTFT "
            f"{independent.row.ttft_p99:.2f} s, most requests deferred inside a server {independent.max_deferred}"
        )
    return lines


def cost_lines(cost: Cost, rounds: int, requests: int) -> list[str]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    pairs_cpu = [on - off for on, off in zip(cost.cpu_us["on"], cost.cpu_us["off"], strict=True)]
    pairs_p50 = [on - off for on, off in zip(cost.p50_ms["on"], cost.p50_ms["off"], strict=True)]
    return [
        f"Paired rounds: {rounds}, each {requests} requests at concurrency 16 (CPU, requests/s) and {requests // 4} at "
        "concurrency 1 (latency), non-streaming, `prefix` policy, one fake llama-server (64 slots, no token delay); "
        "medians over rounds.",
        "",
        "| | `--state` off | `--state` on | on - off (median of pairs) |",
        "|---|---|---|---|",
        f"| balancer CPU µs / request | {med(cost.cpu_us['off']):.0f} | {med(cost.cpu_us['on']):.0f} | "
        f"{med(pairs_cpu):+.0f} |",
        f"| redis-server CPU µs / request | - | {med(cost.redis_cpu_us):.0f} | |",
        f"| latency p50 ms, concurrency 1 | {med(cost.p50_ms['off']):.2f} | {med(cost.p50_ms['on']):.2f} | "
        f"{med(pairs_p50):+.2f} |",
        f"| requests/s, concurrency 16 | {med(cost.rps['off']):.0f} | {med(cost.rps['on']):.0f} | |",
        "",
        f"Errors in the cost phase: {cost.errors}.",
    ]


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="prefix", help="comma-separated llmbalancer policies (default prefix)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {','.join(CONFIGS)}")
    parser.add_argument("--seeds", default=SEEDS, help=f"workload seeds (default {SEEDS})")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of session arrivals per run (30)")
    parser.add_argument("--cost-rounds", type=int, default=6, help="paired rounds of the cost phase (0: skip)")
    parser.add_argument("--cost-requests", type=int, default=2000, help="requests per round at concurrency 16")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    shape = workload.Shape()
    started = datetime.datetime.now(datetime.UTC)
    command = "python bench/replicas.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = results.machine()
    rate, capacity = scheduling.session_rate(FLEET, LOAD, shape)
    plays = [workload.sessions(shape, seed, rate, args.window) for seed in seeds]
    runs: dict[str, dict[str, Run]] = {}
    with tempfile.TemporaryDirectory(prefix="replicasbench-") as tmp:
        for policy in args.policies.split(","):
            for config in args.configs.split(","):
                run = run_config(Path(tmp), config, policy, plays, args.window)
                runs.setdefault(policy, {})[config] = run
                print(scheduling.table([run.row]).splitlines()[-1], f"over slots {run.over_slots}, max deferred "
                      f"{run.max_deferred}, refusals {run.refusals}, downs {run.downs}", flush=True)
        cost = cost_phase(Path(tmp), args.cost_rounds, args.cost_requests) if args.cost_rounds > 0 else None
    load_end = os.getloadavg()[0]
    rows = [run.row for by_config in runs.values() for run in by_config.values()]
    extra = ["| target | over slots | max deferred | refusals | Redis lost |", "|---|---|---|---|---|"] + [
        f"| {run.row.target} | {run.over_slots} | {run.max_deferred} | {run.refusals} | {run.downs} |"
        for by_config in runs.values() for run in by_config.values()
    ]
    body = [
        "## Replicas",
        "",
        f"`{command.strip()}` — {started:%Y-%m-%d %H:%M} UTC, {header}; load average {load_end:.1f} at the end.",
        "",
        f"The scheduling benchmark's workload and mixed fleet at {LOAD:.0%} of capacity ({capacity:.2f} req/s, "
        f"{rate:.2f} sessions/s, {sum(map(len, plays))} sessions and {sum(len(s.turns) for p in plays for s in p)} "
        f"requests over seeds {', '.join(map(str, seeds))}, arrival window {args.window:g} s per seed, a fresh fleet "
        "per seed). `single`: one balancer; `shared`: two replicas on one redis-server, each request to one of them "
        "by a hash of (session, turn); `independent`: the same two without `--state`.",
        "",
        *scheduling.LEGEND,
        "",
        scheduling.table(rows),
        "",
        "**over slots**: most requests a fake server ever ran at once less its slots (0: never above); **max "
        "deferred**: most requests a server ever held waiting for a slot (0: no balancer oversubscribed it); "
        "**refusals**: claims a replica made that another replica's took first (given back, placed again); **Redis "
        "lost**: times a replica marked Redis down.",
        "",
        *extra,
        "",
    ]
    for policy, by_config in runs.items():
        body += [f"Targets ({policy}):", *verdict(by_config), ""]
    if cost is not None:
        body += ["### What the Redis round trips cost", "", *cost_lines(cost, args.cost_rounds, args.cost_requests)]
    results.report("replicas", "\n".join(body), not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
