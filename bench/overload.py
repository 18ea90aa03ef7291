"""Overload benchmark: far more concurrent streaming clients than the fleet has slots, for a minute.

200 clients (``--clients``), each sending one streamed chat completion after another (a closed loop: the
next as soon as the last one ended, whatever its answer), for 60 s (``--duration``), against 4 fake
llama-servers x 4 slots (16 slots: ``--servers``, ``--slots``), through llmbalancer (its default policy, or
``--policy``) and nginx ``least_conn`` (and, with ``--targets``, HAProxy ``leastconn`` or sglang-router
``cache_aware``), in the same run, each on a fresh fleet. Requests under way when the minute ends finish
(up to ``DRAIN_CAP_S``). What a proxy should do here: serve every request (the fleet can, within
``queue.timeout``), never refuse one, and keep the slots busy.

    python bench/overload.py                    # llmbalancer and nginx, ~3 min; writes RESULTS.md's overload section
    python bench/overload.py --duration 20 --no-write   # a quick look

Figures per target: requests sent, served (200 and a finished stream), refused (503), other errors, TTFT
p50/p99 (from sending to the first content token), end-to-end p99, requests served per second of the run,
and slots busy: the share of the fleet's slot-seconds busy over the run's middle half (from the fakes'
timelines; every slot should be busy there, since 200 clients keep more than 16 requests waiting).
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
import scheduling
from sched_figures import busy_share, pct
from sched_report import _f

SECTION = "overload"
DRAIN_CAP_S = 60.0
SIM = fleet.SimParams(token_delay=0.02, prefill_per_token=0.0005, batch_slowdown=0.0, n_ctx=8192)
MAX_TOKENS = 32  # ~0.65 s a request: 16 slots serve ~25 requests/s, and 200 clients wait ~8 s each
PROMPT = "Tell me about load balancers, briefly. " * 4


@dataclass
class Tally:
    sent: int = 0
    served: int = 0
    refused: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    retry_after: list[str] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _one(http: aiohttp.ClientSession, url: str, client: int, tally: Tally) -> None:
    body = {
        "model": fleet.MODEL, "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"{PROMPT} (client {client})"}],
    }
    started = time.monotonic()
    tally.sent += 1
    try:
        async with http.post(url + scheduling.CHAT, json=body) as response:
            if response.status != 200:
                await response.read()
                if response.status == 503:
                    tally.refused += 1
                    tally.retry_after.append(response.headers.get("Retry-After", ""))
                    # A refused client does what Retry-After asks, at most a second (else the loop spins).
                    await asyncio.sleep(min(1.0, float(response.headers.get("Retry-After") or 1)))
                else:
                    tally.error(f"HTTP {response.status}")
                return
            first: float | None = None
            finished = False
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = time.monotonic() - started
                if choice.get("finish_reason"):
                    finished = True
            if first is None or not finished:
                tally.error("unfinished stream")
                return
            tally.served += 1
            tally.ttft.append(first)
            tally.e2e.append(time.monotonic() - started)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        tally.error(type(exc).__name__)


async def _client(http: aiohttp.ClientSession, url: str, client: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        await _one(http, url, client, tally)


async def drive(url: str, clients: int, duration: float) -> tuple[Tally, float, float]:
    """Run the clients for ``duration`` seconds; return the tally, the wall time (drain included), the start."""
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(_client(http, url, i, t0 + duration, tally)) for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=duration + DRAIN_CAP_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for _ in pending:
            tally.error("unfinished at the drain cap")
        return tally, time.monotonic() - t0, t0


@dataclass
class Row:
    target: str
    tally: Tally = field(default_factory=Tally)
    wall: float = 0.0
    busy: float = float("nan")
    note: str = ""


def run_target(workdir: Path, target: str, policy: str | None, specs: list[fleet.ServerSpec], clients: int,
               duration: float, trees: dict[str, Path]) -> Row:
    label = target if target != "llmbalancer" else f"llmbalancer {policy or '(default policy)'}"
    if target in trees:
        label = f"llmbalancer at {target}"
    row = Row(label)
    rundir = workdir / target
    rundir.mkdir()
    procs = peers.Processes(rundir)
    try:
        backends = fleet.start_fleet(procs, specs, SIM)
        port = peers.free_port()
        if target == "llmbalancer" or target in trees:
            fleet.start_llmbalancer(procs, port, backends, policy, trees.get(target, peers.ROOT))
        else:
            scheduling._start_target(procs, target, port, backends, {})
        row.tally, row.wall, t0 = asyncio.run(drive(f"http://127.0.0.1:{port}", clients, duration))
        timelines: list[list[list[float]]] = [fleet.fake_stats(b)["timeline"] for b in backends]  # type: ignore[misc]
        row.busy = busy_share(timelines, [s.slots for s in specs], t0 + duration / 4, t0 + duration * 3 / 4)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        row.note = f"not run: {exc}".splitlines()[0][:200]
    finally:
        procs.stop_all()
    return row


def table(rows: list[Row]) -> str:
    f = _f
    lines = [
        "| target | requests | served | refused (503) | other errors | TTFT p50 s | TTFT p99 s | e2e p99 s "
        "| served/s | slots busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.target} | {r.note} |||||||||")
            continue
        t = r.tally
        errors = sum(t.errors.values())
        kinds = f" ({', '.join(f'{k}: {v}' for k, v in t.errors.items())})" if errors else ""
        lines.append(
            f"| {r.target} | {t.sent} | {t.served} | {t.refused} | {errors}{kinds} | "
            f"{f(pct(t.ttft, 0.5))} | {f(pct(t.ttft, 0.99))} | "
            f"{f(pct(t.e2e, 0.99))} | "
            f"{t.served / r.wall if r.wall else 0:.1f} | {f(r.busy, 100, 0)} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds clients keep sending (default 60)")
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4, help="slots per server (default 4)")
    parser.add_argument("--targets", default="llmbalancer,nginx", help="of: llmbalancer,nginx,haproxy,sglang-router")
    parser.add_argument("--policy", help="llmbalancer's policy (default: its default)")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=TREE",
        help="also run llmbalancer from another checkout (e.g. `git archive main | tar -x -C /tmp/main`)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    trees = {name: Path(tree) for name, _, tree in (c.partition("=") for c in args.compare)}
    specs = [fleet.ServerSpec(args.slots, 1.0)] * args.servers
    started = datetime.datetime.now(datetime.UTC)
    header = results.machine()
    command = "python bench/overload.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        for target in [*args.targets.split(","), *trees]:
            rows.append(run_target(Path(tmp), target, args.policy, specs, args.clients, args.duration, trees))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    ours = [r for r in rows if r.target.startswith("llmbalancer ") and not r.note]
    verdict = [
        f"- {r.target}: {r.tally.served} of {r.tally.sent} served, {r.tally.refused} refused, "
        f"{sum(r.tally.errors.values())} other errors: "
        + ("**every request served, none refused**" if r.tally.served == r.tally.sent
           else "**NOT every request served**")
        for r in ours
    ]
    body = "\n".join([
        "### Overload: 200 streaming clients on 16 slots",
        "",
        f"`{command.strip()}` — {started:%Y-%m-%d %H:%M} UTC, {header}.",
        "",
        f"{args.clients} clients, each sending streamed chat completions back to back for {args.duration:g} s "
        f"({MAX_TOKENS} tokens each, `ignore_eos`), on {args.servers} fake llama-servers x {args.slots} slots "
        f"(token_delay {SIM.token_delay * 1e3:g} ms, no batch slowdown): a fleet that serves about "
        f"{args.servers * args.slots / (MAX_TOKENS * SIM.token_delay):.0f} requests/s. Each target on a fresh fleet; "
        "requests under way at the end finish. **slots busy**: share of slot-seconds busy over the middle half of "
        "the run (the fakes' timelines). A refused client waits what Retry-After says (at most 1 s) and sends "
        "again.",
        "",
        table(rows),
        "",
        *verdict,
    ])
    print("\n" + body)
    if not args.no_write:
        results.write_section(SECTION, body)
        print(f"\nwritten to {results.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
