"""Scheduling benchmark: one seeded multi-turn chat workload through llmbalancer's policies and the peers
users would pick instead (nginx least_conn, HAProxy leastconn, sglang-router cache_aware), in front of
the same simulated llama.cpp fleet, at 50 %, 80 % and 95 % of the fleet's capacity.

The fleet is the project's fake llama-server (``llmbalancer/testing/fake_llama.py``), one process per
server, restarted (cold caches) for every run: slots, a FIFO of deferred requests beyond them, per-slot
and host-RAM prompt caches where prefill time scales with the uncached tokens, decode slowing as more
slots are busy. Fleets: ``homogeneous`` (4 servers x 2 slots) and ``mixed`` (the same, half the servers
2x slower: their token and prefill delays doubled). Workload: ``bench/workload.py``.

    python bench/scheduling.py            # full matrix (~35 min), writes bench/RESULTS.md's Scheduling section
    python bench/scheduling.py --quick    # mixed fleet at 80 %, 4 targets, a short window (~3 min), own section
    python bench/real_fleet.py            # small run against two real llama-servers: prefix vs round_robin

Prerequisites (the script installs nothing; a missing peer's rows say "not run"): Linux, ``apt-get install -y
nginx haproxy``, ``pip install sglang-router`` (0.3.2 measured), and for ``real_fleet.py`` the llama-server
binary and model (``python -m llmbalancer install-llama-server``). Every process runs in its own session and
is stopped (SIGTERM, then SIGKILL) after its run whatever the outcome; a run's sessions are cut off
``DRAIN_CAP_S`` after its arrival window (counted as errors).

Figures per run (``LEGEND`` is written with the table): TTFT p50/p99 and end-to-end p99 (from sending the
request to the first content token / the stream's end, as the client sees them), output tokens/s over the run,
prompt-cache hit ratio (sum of ``timings.cache_n`` / sum of ``cache_n + prompt_n`` from each stream's finish chunk),
errors (non-200, broken or unfinished streams), and "misqueued": seconds requests spent deferred in one
server's FIFO while another server had a free slot (from the fakes' busy/deferred timelines).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import fleet
import peers
import results
import workload

CHAT = "/v1/chat/completions"
POLICIES = ["round_robin", "least_connections", "slot_aware", "prefix", "sticky:prefix"]
PEERS = ["nginx", "haproxy", "sglang-router"]
SIM = fleet.SimParams(token_delay=0.02, prefill_per_token=0.0005, batch_slowdown=0.25, n_ctx=8192)
FLEETS = {
    "homogeneous": [fleet.ServerSpec(2, 1.0)] * 4,
    "mixed": [fleet.ServerSpec(2, 1.0)] * 2 + [fleet.ServerSpec(2, 2.0)] * 2,
}
LEGEND = [
    "Columns: **TTFT** from sending a request to its first content token, **e2e** to the stream's end (client "
    "side, seconds); **out tok/s** content tokens received per second of the run; **cache hit** = sum of "
    "`timings.cache_n` / sum of `cache_n + prompt_n` over the streams' finish chunks (prompt tokens the server "
    "did not have to re-read); **errors** non-200, broken or unfinished streams; **misqueued s** seconds "
    "requests spent deferred in one server's FIFO while another server had a free slot, summed over requests "
    "(from the fakes' busy/deferred timelines), **deferred s** all seconds deferred in server FIFOs (llmbalancer "
    "queues in its own admission queue instead, which neither column counts; it shows in TTFT); **slots busy** "
    "share of the fleet's slot-seconds busy over the second half of the arrival window (the first half is "
    "ramp-up), i.e. the load actually carried. Every run starts a fresh fleet (cold caches). Processes are not "
    "pinned: on a small shared machine the figures carry scheduling noise of tens of milliseconds.",
]
DRAIN_CAP_S = 90.0  # after the arrival window, how long unfinished sessions may run before they count as errors


# --- the client ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    cache_n: int = 0
    prompt_n: int = 0
    error: str = ""


async def _one_request(
    http: aiohttp.ClientSession, url: str, session_id: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[Outcome, str]:
    body = {"model": fleet.MODEL, "messages": messages, "stream": True, "max_tokens": max_tokens, "ignore_eos": True}
    started = time.monotonic()
    out = Outcome(ok=False)
    text: list[str] = []
    try:
        async with http.post(url + CHAT, json=body, headers={"X-Session-ID": session_id}) as response:
            if response.status != 200:
                out.error = f"HTTP {response.status}"
                await response.read()
                return out, ""
            finished = False
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or [{}]
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    if not text:
                        out.ttft_s = time.monotonic() - started
                    text.append(content)
                if choices[0].get("finish_reason"):
                    finished = True
                timings = chunk.get("timings")
                if timings:
                    out.cache_n, out.prompt_n = int(timings["cache_n"]), int(timings["prompt_n"])
            out.e2e_s = time.monotonic() - started
            out.tokens = len(text)
            out.ok = finished and bool(text)
            if not out.ok:
                out.error = "stream ended without a finish chunk"
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        out.error = type(exc).__name__
    return out, "".join(text)


async def _run_session(
    http: aiohttp.ClientSession, url: str, session: workload.Session, t0: float, outcomes: list[Outcome]
) -> None:
    await asyncio.sleep(max(0.0, t0 + session.start_s - time.monotonic()))
    messages = [{"role": "system", "content": session.system}]
    for turn in session.turns:
        messages.append({"role": "user", "content": turn.user})
        outcome, reply = await _one_request(http, url, session.id, messages, turn.max_tokens)
        outcomes.append(outcome)
        if not outcome.ok:
            return  # a user whose chat broke does not go on with it
        messages.append({"role": "assistant", "content": reply})
        await asyncio.sleep(turn.think_s)


async def drive(
    url: str, sessions: list[workload.Session], window_s: float
) -> tuple[list[Outcome], float, float]:
    """Play the sessions against ``url``; return every request's outcome, the run's wall time, its start."""
    outcomes: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(_run_session(http, url, s, t0, outcomes)) for s in sessions]
        _, pending = await asyncio.wait(tasks, timeout=window_s + DRAIN_CAP_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - t0
    # a session cut off by the cap counts as one error: its request in flight was never served
    outcomes.extend(Outcome(ok=False, error="unfinished") for _ in pending)
    return outcomes, wall, t0


# --- figures ------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def busy_share(timelines: list[list[list[float]]], slots: list[int], start: float, end: float) -> float:
    """Share of the fleet's slot-seconds busy between ``start`` and ``end`` (the load actually carried)."""
    busy_s = 0.0
    for timeline in timelines:
        busy, last = 0, start
        for t, now_busy, _ in timeline:
            if t > start:
                busy_s += busy * (min(t, end) - last)
                last = min(t, end)
            busy = int(now_busy)
            if t >= end:
                break
        busy_s += busy * max(0.0, end - last)
    return busy_s / (sum(slots) * (end - start))


def misqueued_seconds(timelines: list[list[list[float]]], slots: list[int]) -> tuple[float, float]:
    """(seconds deferred while another server had a free slot, total seconds deferred), summed over requests."""
    events = sorted((t, i, busy, deferred) for i, tl in enumerate(timelines) for t, busy, deferred in tl)
    busy_now = [0] * len(timelines)
    deferred_now = [0] * len(timelines)
    wasted = total = 0.0
    last_t = events[0][0] if events else 0.0
    for t, i, busy, deferred in events:
        dt = t - last_t
        if dt > 0:
            for a, waiting in enumerate(deferred_now):
                if waiting:
                    total += waiting * dt
                    if any(busy_now[b] < slots[b] for b in range(len(slots)) if b != a):
                        wasted += waiting * dt
        busy_now[i], deferred_now[i] = int(busy), int(deferred)
        last_t = t
    return wasted, total


@dataclass
class Row:
    fleet: str
    load: float
    target: str
    requests: int = 0
    errors: int = 0
    ttft_p50: float = float("nan")
    ttft_p99: float = float("nan")
    e2e_p99: float = float("nan")
    tokens_per_s: float = 0.0
    hit_ratio: float = float("nan")
    misqueued_s: float = 0.0
    deferred_s: float = 0.0
    busy_share: float = float("nan")
    note: str = ""
    error_kinds: dict[str, int] = field(default_factory=dict)


def summarize(row: Row, outcomes: list[Outcome], wall: float) -> None:
    good = [o for o in outcomes if o.ok]
    row.requests = len(outcomes)
    row.errors = len(outcomes) - len(good)
    for o in outcomes:
        if not o.ok:
            row.error_kinds[o.error] = row.error_kinds.get(o.error, 0) + 1
    if good:
        row.ttft_p50 = pct([o.ttft_s for o in good], 0.50)
        row.ttft_p99 = pct([o.ttft_s for o in good], 0.99)
        row.e2e_p99 = pct([o.e2e_s for o in good], 0.99)
        row.tokens_per_s = sum(o.tokens for o in good) / wall
        seen = sum(o.cache_n + o.prompt_n for o in good)
        row.hit_ratio = sum(o.cache_n for o in good) / seen if seen else float("nan")


# --- one run ------------------------------------------------------------------------------------


def _start_target(procs: peers.Processes, target: str, port: int, backends: list[int]) -> None:
    if target == "nginx":
        fleet.start_nginx(procs, port, backends)
    elif target == "haproxy":
        fleet.start_haproxy(procs, port, backends)
    elif target == "sglang-router":
        fleet.start_sglang(procs, port, backends)
    else:
        fleet.start_llmbalancer(procs, port, backends, target)


def run_one(workdir: Path, fleet_name: str, load: float, target: str, plays: list[list[workload.Session]],
            window_s: float) -> Row:
    """Play each seed's sessions against ``target`` on a fresh fleet, in turn; one row pools them all."""
    row = Row(fleet_name, load, target if target in PEERS else f"llmbalancer {target}")
    specs = FLEETS[fleet_name]
    slots = [s.slots for s in specs]
    pooled: list[Outcome] = []
    walls = 0.0
    busy: list[float] = []
    for play, sessions in enumerate(plays):
        rundir = workdir / f"{fleet_name}-{int(load * 100)}-{target.replace(':', '_')}-{play}"
        rundir.mkdir()
        procs = peers.Processes(rundir)
        try:
            backends = fleet.start_fleet(procs, specs, SIM)
            port = peers.free_port()
            _start_target(procs, target, port, backends)
            outcomes, wall, t0 = asyncio.run(drive(f"http://127.0.0.1:{port}", sessions, window_s))
            pooled += outcomes
            walls += wall
            timelines: list[list[list[float]]] = [fleet.fake_stats(b)["timeline"] for b in backends]  # type: ignore[misc]
            misqueued, deferred = misqueued_seconds(timelines, slots)
            row.misqueued_s += misqueued
            row.deferred_s += deferred
            # over the window's second half: the first is ramp-up (sessions accumulating)
            busy.append(busy_share(timelines, slots, t0 + window_s / 2, t0 + window_s))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            row.note = f"not run: {exc}".splitlines()[0][:200]
            return row
        finally:
            procs.stop_all()
    summarize(row, pooled, walls)
    row.busy_share = sum(busy) / len(busy)
    return row


def session_rate(fleet_name: str, load: float, shape: workload.Shape) -> tuple[float, float]:
    """(sessions per second, fleet capacity in requests per second) for ``load`` x capacity."""
    capacity = sum(
        spec.slots / (spec.speed * workload.request_work_s(
            shape, SIM.token_delay, SIM.prefill_per_token, SIM.batch_slowdown, spec.slots))
        for spec in FLEETS[fleet_name]
    )
    return load * capacity / workload.mean_turns(shape), capacity


# --- output -------------------------------------------------------------------------------------


def _f(value: float, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value != value else f"{value * scale:.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| fleet | load | target | requests | errors | TTFT p50 s | TTFT p99 s | e2e p99 s | out tok/s "
        "| cache hit | misqueued s | deferred s | slots busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.fleet} | {r.load:.0%} | {r.target} | {r.note} ||||||||||")
            continue
        errors = str(r.errors) + (f" ({', '.join(f'{k}: {v}' for k, v in r.error_kinds.items())})" if r.errors else "")
        lines.append(
            f"| {r.fleet} | {r.load:.0%} | {r.target} | {r.requests} | {errors} | {_f(r.ttft_p50)} | "
            f"{_f(r.ttft_p99)} | {_f(r.e2e_p99)} | {_f(r.tokens_per_s, digits=0)} | {_f(r.hit_ratio, 100, 0)} % | "
            f"{_f(r.misqueued_s, digits=1)} | {_f(r.deferred_s, digits=1)} | {_f(r.busy_share, 100, 0)} % |"
        )
    return "\n".join(lines)


def verdict(rows: list[Row]) -> list[str]:
    """The issue's targets, judged on the mixed fleet at 80 %."""
    at = [r for r in rows if r.fleet == "mixed" and abs(r.load - 0.8) < 1e-9 and not r.note]
    ours = [r for r in at if r.target.startswith("llmbalancer")]
    theirs = [r for r in at if not r.target.startswith("llmbalancer")]
    out: list[str] = []
    sglang = next((r for r in theirs if r.target == "sglang-router"), None)
    if ours and theirs and sglang is not None:
        # One policy must meet both: p99 TTFT >= 20 % below the best peer's, cache hits >= sglang-router's.
        peer = min(theirs, key=lambda r: r.ttft_p99)
        met = []
        for row in sorted(ours, key=lambda r: r.ttft_p99):
            gain = 1 - row.ttft_p99 / peer.ttft_p99
            both = gain >= 0.2 and row.hit_ratio >= sglang.hit_ratio
            met += [row.target] if both else []
            out.append(
                f"- {row.target}: p99 TTFT {row.ttft_p99:.2f} s, {gain:.0%} below the best peer's ({peer.target} "
                f"{peer.ttft_p99:.2f} s; target >= 20 %); cache hit {row.hit_ratio:.1%} vs sglang-router "
                f"{sglang.hit_ratio:.1%} (target: at least as high): {'both met' if both else 'not both'}"
            )
        out.append(f"- **verdict: met by {', '.join(met)}**" if met else "- **verdict: MISSED by every policy**")
    errs = [r for r in rows if r.target.startswith("llmbalancer") and r.errors]
    out.append(
        "- errors: none from any llmbalancer policy at any load" if not errs else
        "- errors from llmbalancer: " + "; ".join(f"{r.target} {r.fleet} {r.load:.0%}: {r.errors}" for r in errs)
    )
    return out


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="mixed fleet at 80 %% only, 4 targets, 15 s window (~3 min)"
    )
    parser.add_argument("--window", type=float, help="seconds of session arrivals per run (default 30, quick 20)")
    parser.add_argument("--fleets", help="comma-separated: homogeneous,mixed")
    parser.add_argument("--loads", help="comma-separated fractions of capacity (default 0.5,0.8,0.95)")
    parser.add_argument("--targets", help=f"comma-separated, of: {','.join(POLICIES + PEERS)}")
    parser.add_argument(
        "--seeds", default="7",
        help="comma-separated workload seeds; each is played on a fresh fleet and a row pools them (default 7)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument(
        "--section", default="scheduling",
        help="the RESULTS.md section to (re)write (default: scheduling, the full matrix; --quick: scheduling-quick)",
    )
    args = parser.parse_args(argv)
    window = args.window or (15.0 if args.quick else 30.0)
    fleets = args.fleets.split(",") if args.fleets else (["mixed"] if args.quick else list(FLEETS))
    loads = [float(x) for x in args.loads.split(",")] if args.loads else ([0.8] if args.quick else [0.5, 0.8, 0.95])
    default_targets = ["least_connections", "sticky:prefix", "nginx", "sglang-router"] if args.quick \
        else POLICIES + PEERS
    targets = args.targets.split(",") if args.targets else default_targets
    shape = workload.Shape()
    started = datetime.datetime.now(datetime.UTC)
    command = "python bench/scheduling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = results.machine()
    rows: list[Row] = []
    capacity_lines: list[str] = []
    seeds = [int(seed) for seed in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="schedbench-") as tmp:
        for fleet_name in fleets:
            for load in loads:
                rate, capacity = session_rate(fleet_name, load, shape)
                plays = [workload.sessions(shape, seed, rate, window) for seed in seeds]
                capacity_lines.append(
                    f"- {fleet_name} {load:.0%}: capacity {capacity:.2f} req/s, {rate:.2f} sessions/s, "
                    f"{sum(map(len, plays))} sessions, {sum(len(s.turns) for p in plays for s in p)} requests"
                )
                print(capacity_lines[-1], flush=True)
                for target in targets:
                    row = run_one(Path(tmp), fleet_name, load, target, plays, window)
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
    body = "\n".join([
        "### Scheduling, quick run" if args.quick else
        "## Scheduling" if args.section == "scheduling" else f"### Scheduling: {args.section}",
        "",
        f"`{command.strip()}` — {started:%Y-%m-%d %H:%M} UTC, {header}.",
        "",
        *LEGEND,
        "",
        f"Fleet simulation: fake llama-servers, 2 slots each, token_delay {SIM.token_delay * 1e3:g} ms, prefill "
        f"{SIM.prefill_per_token * 1e3:g} ms per uncached token, decode step "
        f"x(1 + {SIM.batch_slowdown:g} x (busy - 1)); "
        "slow servers (mixed fleet) double both. Arrival window "
        f"{window:g} s per run, seeds {', '.join(map(str, seeds))} (each seed's sessions played on a fresh fleet; "
        "a row pools the requests of all seeds). Capacity = sum over servers of slots / (mean request work "
        "with every slot busy and ideal prefix reuse):",
        "",
        *capacity_lines,
        "",
        table(rows),
        "",
        "Targets (mixed fleet, 80 %):",
        *verdict(rows),
        *([
            "",
            "A smoke run: its short window is mostly ramp-up (see the slots busy column), so the fleet carries "
            "far less than the nominal load and the verdict above is not the issue's; the full run's is.",
        ] if args.quick else []),
    ])
    print("\n" + body)
    if not args.no_write:
        # A smoke run or a partial one writes its own section, so that it never replaces the full matrix.
        name = "scheduling-quick" if args.quick and args.section == "scheduling" else args.section
        results.write_section(name, body)
        print(f"\nwritten to {results.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
