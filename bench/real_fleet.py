"""The scheduling workload, small and short, against two real llama-servers (SmolLM2, 2 slots each,
``tests.support.start_llama_server``) through llmbalancer ``prefix`` and ``round_robin``: does cache-aware
routing show in the real server's own ``timings.cache_n``? Servers are restarted (cold caches) per policy.

    python bench/real_fleet.py [--seed N] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import tempfile
from pathlib import Path

import fleet
import peers
import results
import sched_report
import scheduling
import workload

sys.path.insert(0, str(peers.ROOT))

from tests.support import start_llama_server, wait_ready  # the repository root, just added to the path

SECTION = "scheduling-real"
# Small enough for one CPU thread per server and 2048 tokens of context per slot.
SHAPE = workload.Shape(
    system_prompts=2, system_words=(120, 200), turns=(3, 4), user_words=(10, 30), reply_tokens=(8, 16),
    think_mean_s=0.3,
)
SESSION_RATE = 0.8  # sessions per second
WINDOW_S = 12.0


def run_policy(workdir: Path, policy: str, sessions: list[workload.Session]) -> sched_report.Row:
    row = sched_report.Row("2 real llama-servers", 0.0, f"llmbalancer {policy}")
    procs = peers.Processes(workdir)
    servers = []
    try:
        servers = [start_llama_server(workdir) for _ in range(2)]
        for server in servers:
            wait_ready(server.url, timeout=120)
        port = peers.free_port()
        fleet.start_llmbalancer(procs, port, [s.port for s in servers], policy)
        outcomes, wall, _ = asyncio.run(scheduling.drive(f"http://127.0.0.1:{port}", sessions, WINDOW_S))
        sched_report.summarize(row, outcomes, wall)
    except (RuntimeError, OSError, TimeoutError) as exc:
        row.note = f"not run: {exc}".splitlines()[0][:200]
    finally:
        procs.stop_all()
        for server in servers:
            server.stop()
    return row


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7, help="workload seed (one: each policy takes minutes)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    sessions = workload.sessions(SHAPE, args.seed, SESSION_RATE, WINDOW_S)
    started = datetime.datetime.now(datetime.UTC)
    header = results.machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="schedbench-real-") as tmp:
        for policy in ("round_robin", "prefix"):
            workdir = Path(tmp) / policy
            workdir.mkdir()
            rows.append(run_policy(workdir, policy, sessions))
            print(sched_report.table(rows[-1:]).splitlines()[-1], flush=True)
    body = "\n".join([
        "### Two real llama-servers",
        "",
        f"`python bench/real_fleet.py` — {started:%Y-%m-%d %H:%M} UTC, {header}. SmolLM2 (llama-server "
        f"`-np 2 -t 1`), {len(sessions)} sessions, {sum(len(s.turns) for s in sessions)} requests "
        f"({SESSION_RATE:g} sessions/s over {WINDOW_S:g} s, {SHAPE.turns[0]}-{SHAPE.turns[1]} turns, "
        f"system prompts {SHAPE.system_words[0]}-{SHAPE.system_words[1]} words); cache hit ratio from the real "
        "server's `timings.cache_n` / `prompt_n`. The load column does not apply.",
        "",
        sched_report.table(rows),
    ])
    results.report(SECTION, body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
