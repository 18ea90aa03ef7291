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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import fleet
import peers
import results
import workload
from sched_figures import busy_share, idle_while_waiting, misqueued_seconds, oracle_hit_ratio
from sched_report import LEGEND, Row, summarize, table, verdict, verdict15

CHAT = "/v1/chat/completions"
POLICIES = ["round_robin", "least_connections", "slot_aware", "prefix", "sticky:prefix"]
PEERS = ["nginx", "haproxy", "sglang-router"]
SIM = fleet.SimParams(token_delay=0.02, prefill_per_token=0.0005, batch_slowdown=0.25, n_ctx=8192)
FLEETS = {
    "homogeneous": [fleet.ServerSpec(2, 1.0)] * 4,
    "mixed": [fleet.ServerSpec(2, 1.0)] * 2 + [fleet.ServerSpec(2, 2.0)] * 2,
    "mixed-4x4": [fleet.ServerSpec(4, 1.0)] * 2 + [fleet.ServerSpec(4, 2.0)] * 2,
}


@dataclass(frozen=True)
class Scenario:
    """One load on one fleet: ``label`` names it in the table's fleet column."""

    label: str
    fleet: str
    load: float
    shape: workload.Shape
    window_s: float


# Issue 15's: more arrivals than the fleet can take for a minute (4 servers x 4 slots, two of them half
# speed, replies of up to 160 tokens), then the backlog drains.
SATURATED = Scenario("saturated", "mixed-4x4", 1.15, workload.Shape(reply_tokens=(24, 160)), 60.0)
MIXED80 = Scenario("mixed", "mixed", 0.8, workload.Shape(), 30.0)
SCENARIOS = {"saturated": SATURATED, "mixed80": MIXED80}
DUMP: Path | None = None  # --dump: each run's outcomes and timelines as JSON, for a closer look
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
    sent_at: float = 0.0  # monotonic, system-wide: comparable with the fakes' timelines
    ended_at: float = 0.0
    session: str = ""
    turn: int = 0


async def _one_request(
    http: aiohttp.ClientSession, url: str, session_id: str, messages: list[dict[str, str]], max_tokens: int,
    request_id: str = "",
) -> tuple[Outcome, str]:
    body = {"model": fleet.MODEL, "messages": messages, "stream": True, "max_tokens": max_tokens, "ignore_eos": True}
    started = time.monotonic()
    out = Outcome(ok=False, sent_at=started)
    text: list[str] = []
    try:
        headers = {"X-Session-ID": session_id, "X-Request-ID": request_id}
        async with http.post(url + CHAT, json=body, headers=headers) as response:
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
    out.ended_at = time.monotonic()
    return out, "".join(text)


async def _run_session(
    http: aiohttp.ClientSession, url: str, session: workload.Session, t0: float, outcomes: list[Outcome]
) -> None:
    await asyncio.sleep(max(0.0, t0 + session.start_s - time.monotonic()))
    messages = [{"role": "system", "content": session.system}]
    for index, turn in enumerate(session.turns):
        messages.append({"role": "user", "content": turn.user})
        request_id = f"{session.id}.{index}"
        outcome, reply = await _one_request(http, url, session.id, messages, turn.max_tokens, request_id)
        outcome.session, outcome.turn = session.id, index
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


# --- one run ------------------------------------------------------------------------------------


def _start_target(procs: peers.Processes, target: str, port: int, backends: list[int], trees: dict[str, Path]) -> None:
    """``target``: a peer, or an llmbalancer policy, optionally ``POLICY@TREE`` (a checkout named by ``--compare``)
    and ``POLICY[section.key=value;...]`` (settings given as ``LLMBALANCER_*`` variables; ``env:NAME=value``
    sets a variable as named)."""
    if target == "nginx":
        fleet.start_nginx(procs, port, backends)
    elif target == "haproxy":
        fleet.start_haproxy(procs, port, backends)
    elif target == "sglang-router":
        fleet.start_sglang(procs, port, backends)
    else:
        policy, _, settings = target.partition("[")
        policy, _, tree = policy.partition("@")
        env = {}
        for setting in filter(None, settings.rstrip("]").split(";")):
            key, _, value = setting.partition("=")
            key = key.strip()
            name = key[4:] if key.startswith("env:") else "LLMBALANCER_" + key.upper().replace(".", "__")
            env[name] = value.strip()
        fleet.start_llmbalancer(procs, port, backends, policy, trees[tree] if tree else peers.ROOT, env)


def run_one(workdir: Path, scenario: Scenario, target: str, plays: list[list[workload.Session]],
            trees: dict[str, Path]) -> Row:
    """Play each seed's sessions against ``target`` on a fresh fleet, in turn; one row pools them all."""
    row = Row(scenario.label, scenario.load, target if target in PEERS else f"llmbalancer {target}")
    specs = FLEETS[scenario.fleet]
    slots = [s.slots for s in specs]
    window_s = scenario.window_s
    pooled: list[Outcome] = []
    walls = 0.0
    busy: list[float] = []
    idle: list[tuple[float, float]] = []  # (idle-while-waiting slot-seconds share, run seconds) per seed
    for play, sessions in enumerate(plays):
        name = "".join(c if c.isalnum() else "_" for c in target)
        rundir = workdir / f"{scenario.label}-{int(scenario.load * 100)}-{name}-{play}"
        rundir.mkdir()
        procs = peers.Processes(rundir)
        try:
            backends = fleet.start_fleet(procs, specs, SIM)
            port = peers.free_port()
            _start_target(procs, target, port, backends, trees)
            outcomes, wall, t0 = asyncio.run(drive(f"http://127.0.0.1:{port}", sessions, window_s))
            pooled += outcomes
            walls += wall
            timelines: list[list[list[float]]] = [fleet.fake_stats(b)["timeline"] for b in backends]  # type: ignore[misc]
            misqueued, deferred = misqueued_seconds(timelines, slots)
            row.misqueued_s += misqueued
            row.deferred_s += deferred
            # over the window's second half: the first is ramp-up (sessions accumulating)
            busy.append(busy_share(timelines, slots, t0 + window_s / 2, t0 + window_s))
            if DUMP is not None:
                (DUMP / f"{rundir.name}.json").write_text(json.dumps({
                    "t0": t0, "wall": wall, "timelines": timelines, "outcomes": [vars(o) for o in outcomes],
                }))
                if (rundir / "llmbalancer.log").exists():
                    (DUMP / f"{rundir.name}.log").write_bytes((rundir / "llmbalancer.log").read_bytes())
            sent = [(o.sent_at, o.ended_at) for o in outcomes if o.sent_at]
            idle.append((idle_while_waiting(timelines, slots, sent, t0, t0 + wall), wall))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            row.note = f"not run: {exc}".splitlines()[0][:200]
            return row
        finally:
            procs.stop_all()
    summarize(row, pooled, walls)
    row.busy_share = sum(busy) / len(busy)
    row.idle_waiting = sum(share * wall for share, wall in idle) / sum(wall for _, wall in idle)
    return row


def session_rate(scenario: Scenario) -> tuple[float, float]:
    """(sessions per second, fleet capacity in requests per second) for the scenario's load x capacity."""
    shape = scenario.shape
    capacity = sum(
        spec.slots / (spec.speed * workload.request_work_s(
            shape, SIM.token_delay, SIM.prefill_per_token, SIM.batch_slowdown, spec.slots))
        for spec in FLEETS[scenario.fleet]
    )
    return scenario.load * capacity / workload.mean_turns(shape), capacity


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="mixed fleet at 80 %% only, 4 targets, 15 s window (~3 min)"
    )
    parser.add_argument("--window", type=float, help="seconds of session arrivals per run (default 30, quick 20)")
    parser.add_argument("--fleets", help="comma-separated: homogeneous,mixed")
    parser.add_argument("--loads", help="comma-separated fractions of capacity (default 0.5,0.8,0.95)")
    parser.add_argument(
        "--scenarios",
        help="comma-separated, of: saturated,mixed80 (issue 15's; instead of --fleets/--loads; judged together)",
    )
    parser.add_argument("--targets", help=f"comma-separated, of: {','.join(POLICIES + PEERS)}")
    parser.add_argument(
        "--seeds", default="7",
        help="comma-separated workload seeds; each is played on a fresh fleet and a row pools them (default 7)",
    )
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=TREE",
        help="a checkout to run llmbalancer from, as target POLICY@NAME (`git archive main | tar -x -C TREE`)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--dump", type=Path, help="a folder to write each run's outcomes and timelines to (JSON)")
    parser.add_argument(
        "--section", default="scheduling",
        help="the RESULTS.md section to (re)write (default: scheduling, the full matrix; --quick: scheduling-quick)",
    )
    args = parser.parse_args(argv)
    global DUMP
    DUMP = args.dump
    if DUMP is not None:
        DUMP.mkdir(parents=True, exist_ok=True)
    window = args.window or (15.0 if args.quick else 30.0)
    fleets = args.fleets.split(",") if args.fleets else (["mixed"] if args.quick else ["homogeneous", "mixed"])
    loads = [float(x) for x in args.loads.split(",")] if args.loads else ([0.8] if args.quick else [0.5, 0.8, 0.95])
    if args.scenarios:
        scenarios = [SCENARIOS[name] for name in args.scenarios.split(",")]
        if args.window:
            scenarios = [Scenario(s.label, s.fleet, s.load, s.shape, args.window) for s in scenarios]
    else:
        scenarios = [Scenario(f, f, load, workload.Shape(), window) for f in fleets for load in loads]
    default_targets = ["least_connections", "sticky:prefix", "nginx", "sglang-router"] if args.quick \
        else POLICIES + PEERS
    targets = args.targets.split(",") if args.targets else default_targets
    trees = {name: Path(tree) for name, _, tree in (c.partition("=") for c in args.compare)}
    started = datetime.datetime.now(datetime.UTC)
    command = "python bench/scheduling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = results.machine()
    rows: list[Row] = []
    capacity_lines: list[str] = []
    oracles: dict[str, float] = {}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="schedbench-") as tmp:
        for scenario in scenarios:
            rate, capacity = session_rate(scenario)
            plays = [workload.sessions(scenario.shape, seed, rate, scenario.window_s) for seed in seeds]
            oracles[scenario.label] = oracle = oracle_hit_ratio(plays)
            servers = FLEETS[scenario.fleet]
            capacity_lines.append(
                f"- {scenario.label} {scenario.load:.0%} ({len(servers)} servers: slots "
                f"{'/'.join(str(s.slots) for s in servers)}, speeds {'/'.join(f'{1 / s.speed:g}' for s in servers)}; "
                f"replies {scenario.shape.reply_tokens[0]}-{scenario.shape.reply_tokens[1]} tokens; arrivals for "
                f"{scenario.window_s:g} s): capacity {capacity:.2f} req/s, {rate:.2f} sessions/s, "
                f"{sum(map(len, plays))} sessions, {sum(len(s.turns) for p in plays for s in p)} requests; "
                f"oracle hit ratio {oracle:.1%}"
            )
            print(capacity_lines[-1], flush=True)
            for target in targets:
                row = run_one(Path(tmp), scenario, target, plays, trees)
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
        f"Fleet simulation: fake llama-servers, token_delay {SIM.token_delay * 1e3:g} ms, prefill "
        f"{SIM.prefill_per_token * 1e3:g} ms per uncached token, decode step "
        f"x(1 + {SIM.batch_slowdown:g} x (busy - 1)); "
        "slow servers double both. Seeds "
        f"{', '.join(map(str, seeds))} (each seed's sessions played on a fresh fleet; "
        "a row pools the requests of all seeds). Capacity = sum over servers of slots / (mean request work "
        "with every slot busy and ideal prefix reuse); oracle hit ratio: every turn on the server holding its "
        "history (`sched_figures.oracle_hit_ratio`):",
        "",
        *capacity_lines,
        "",
        table(rows),
        "",
        *(["Targets (issue 15: saturated and mixed 80 %):", *verdict15(rows, oracles), ""] if args.scenarios else []),
        "Targets (issue 4: mixed fleet, 80 %):",
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
