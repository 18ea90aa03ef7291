"""Bursts larger than a real fleet's slots: are any attempts retried, any errors charged to a healthy server?

Two real llama-servers as `scripts/run.sh` launches them (`llamafile_commands.txt`: SmolLM2, `-np 2 -t 1`),
supervised by one `llmbalancer serve`; then `--bursts` times in a row, `--streams` concurrent streamed chat
completions of `--tokens` tokens each (`ignore_eos`). After each burst the balancer's own figures are read:
`llmbalancer_retries_total` from `/metrics`, every backend's `errors_total` and `last_error` from the snapshot.
The hardening issue measured 4-13 retries per burst of 20 x 150 tokens, errors charged in most runs and a 502
in some; the cause is a llama-server race (`relay/proxy.py: drops_connections_reused_after_a_stream`).
`--compare DIR` runs the balancer of another checkout too (a `git worktree` of an older commit), after this one.

    python bench/burst_retries.py [--bursts 3] [--streams 20] [--tokens 150] [--compare DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import peers
import results

SECTION = "burst-retries"


async def _stream(session: aiohttp.ClientSession, url: str, index: int, tokens: int) -> tuple[int, bool]:
    body = {
        "model": "smollm2", "stream": True, "max_tokens": tokens, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"Tell me a long story, number {index}."}],
    }
    async with session.post(url + "/v1/chat/completions", json=body) as reply:
        data = await reply.read()
        return reply.status, b"event: error" in data


async def _figures(session: aiohttp.ClientSession, url: str) -> tuple[float, list[tuple[str, int, str | None]]]:
    async with session.get(url + "/metrics") as reply:
        text = await reply.text()
    retries = next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("llmbalancer_retries_total")
    )
    async with session.get(url + "/llmhealth-snapshot") as reply:
        snapshot = await reply.json()
    return retries, [(b["name"], b["errors_total"], b["last_error"]) for b in snapshot["backends"]]


async def _ready(session: aiohttp.ClientSession, url: str) -> None:
    """The balancer up and both servers routable (bounded)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/health") as reply:
                if (await reply.json()).get("backends_healthy") == 2:
                    return
        except aiohttp.ClientError:
            pass  # not listening yet
        await asyncio.sleep(0.5)
    raise TimeoutError("the fleet did not become healthy within 120 s")


async def _run(url: str, label: str, bursts: int, streams: int, tokens: int) -> list[str]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _ready(session, url)
        previous = 0.0
        for burst in range(1, bursts + 1):
            started = time.monotonic()
            outcomes = await asyncio.gather(*(_stream(session, url, i, tokens) for i in range(streams)))
            wall = time.monotonic() - started
            retries, backends = await _figures(session, url)
            statuses = sorted({status for status, _ in outcomes})
            charged = ", ".join(f"{name}: {count}" + (f" ({last})" if last else "") for name, count, last in backends)
            rows.append(
                f"| {label} | {burst} | {streams} x {tokens} | {wall:.1f} | {statuses} | "
                f"{sum(e for _, e in outcomes)} | {retries - previous:g} | {charged} |"
            )
            print(rows[-1], flush=True)
            previous = retries
    return rows


def _measure(label: str, tree: Path, args: argparse.Namespace) -> list[str]:
    port = peers.free_port()
    with tempfile.TemporaryDirectory(prefix="burst-") as workdir:
        procs = peers.Processes(Path(workdir))
        try:
            procs.start(
                "llmbalancer",
                ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "llmbalancer", "serve", "--port", str(port),
                 "--log-format", "json", "--commands", str(peers.ROOT / "llamafile_commands.txt")],
                None, cwd=Path(workdir),
            )
            return asyncio.run(_run(f"http://127.0.0.1:{port}", label, args.bursts, args.streams, args.tokens))
        finally:
            procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--compare", action="append", default=[], metavar="DIR", help="another checkout, run after")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    header = results.machine()
    rows: list[str] = []
    for label, tree in [("this checkout", peers.ROOT), *((f"`{Path(d).name}`", Path(d)) for d in args.compare)]:
        rows += _measure(label, tree, args)
    body = "\n".join([
        "### Bursts on the real fleet: retries and errors charged",
        "",
        f"`python bench/burst_retries.py {' '.join(argv if argv is not None else sys.argv[1:])}` — "
        f"{started:%Y-%m-%d %H:%M} UTC, {header}. The fleet of `llamafile_commands.txt` (two llama-servers, "
        "SmolLM2, 2 slots each), supervised by the balancer; bursts run back to back.",
        "",
        "| balancer | burst | streams x tokens | wall s | statuses | error events | retries | errors charged |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    results.report(SECTION, body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
