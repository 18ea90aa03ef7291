"""Proxy overhead, side by side in one run: an instant backend reached directly, through llmbalancer,
through nginx (least_conn) and through sglang-router, each proxy pinned to the same single core.

Measures non-streaming latency p50/p99 at concurrency 1 (added latency = proxy p50 - direct p50) and
requests/s at concurrency 64 (wrk), then SSE streams: chunks/s at concurrency 64 and time to first chunk.
Rounds interleave the targets so that drift on a shared machine spreads over all of them; figures are
medians over rounds. Prerequisites and how to read the figures: bench/README.md.

    python bench/proxy_overhead.py [--duration 3] [--rounds 3] [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
import results
from stream_load import run_streams

SECTION = "proxy-overhead"
PATH = "/v1/chat/completions"
REQUEST = b'{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'
COMPLETION = (
    b'{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":"Hello!"}}],'
    b'"created":1700000000,"model":"bench","object":"chat.completion","id":"chatcmpl-bench",'
    b'"usage":{"completion_tokens":2,"prompt_tokens":9,"total_tokens":11}}'
)
DIRECT, LLMBALANCER, NGINX, SGLANG = "direct", "llmbalancer", "nginx", "sglang-router"


@dataclass
class Figures:
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rps_c64: list[float] = field(default_factory=list)
    cpu_us_c64: list[float] = field(default_factory=list)
    chunks_c64: list[float] = field(default_factory=list)
    ttfc_p50_ms: list[float] = field(default_factory=list)
    ttfc_p99_ms: list[float] = field(default_factory=list)
    ttfc_c64_p50_ms: list[float] = field(default_factory=list)
    errors: int = 0


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _get(figures: dict[str, Figures], target: str) -> Figures:
    return figures.get(target) or Figures()


# --- wrk ----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_ms(text: str, label: str) -> float:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not match:
        raise RuntimeError(f"wrk output has no {label!r} line:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(wrk: str, script: Path, port: int, connections: int, duration: float, core: int | None) -> dict[str, float]:
    command = [
        wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "--latency", "-s", str(script),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 30,
        preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None,
    )
    out = result.stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    requests = re.search(r"^\s*(\d+) requests in", out, re.M)
    if result.returncode != 0 or not rps:
        raise RuntimeError(f"wrk failed ({result.returncode}): {out}{result.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return {
        "p50": _wrk_ms(out, "50%"), "p99": _wrk_ms(out, "99%"), "rps": float(rps.group(1)), "errors": errors,
        "requests": int(requests.group(1)) if requests else 0,
    }


def write_wrk_script(workdir: Path) -> Path:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{REQUEST.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


# --- phases -------------------------------------------------------------------------------------


@dataclass
class Setup:
    args: argparse.Namespace
    procs: peers.Processes
    nginx: str | None
    targets: list[str]
    figures: dict[str, Figures]
    notes: list[str]


def _start_compared(setup: Setup, backend_port: int, label: str, tree: Path, port: int) -> object:
    return peers.start_llmbalancer(setup.procs, port, backend_port, setup.args.proxy_core, name=label, tree=tree)


def start_proxies(setup: Setup, backend_port: int) -> dict[str, tuple[int, int | None]]:
    """Start every proxy in front of ``backend_port``; return target -> (port, process group or None)."""
    ports: dict[str, tuple[int, int | None]] = {DIRECT: (backend_port, None)}
    core = setup.args.proxy_core
    starters: dict[str, Callable[[int], object]] = {
        LLMBALANCER: lambda p: peers.start_llmbalancer(setup.procs, p, backend_port, core),
        NGINX: lambda p: peers.start_nginx_proxy(setup.procs, setup.nginx or "", p, backend_port, core),
        SGLANG: lambda p: peers.start_sglang_router(setup.procs, p, backend_port, core),
    }
    for label, tree in setup.args.compare:
        starters[label] = functools.partial(_start_compared, setup, backend_port, label, tree)
    for target in setup.targets:
        if target == DIRECT:
            continue
        port = peers.free_port()
        process = starters[target](port)
        assert isinstance(process, subprocess.Popen)
        try:
            peers.wait_http(f"http://127.0.0.1:{port}{PATH}", process, 60, post=REQUEST)
        except RuntimeError as exc:
            raise RuntimeError(f"{target} did not start: {exc}\n{setup.procs.log_tail(target)}") from exc
        ports[target] = (port, process.pid)
    return ports


def non_streaming_phase(setup: Setup, wrk: str) -> None:
    args = setup.args
    backend_port = peers.free_port()
    if setup.nginx:
        peers.start_nginx_backend(setup.procs, setup.nginx, backend_port, COMPLETION, args.load_core)
        setup.notes.append("non-streaming backend: nginx `return 200 '<chat completion JSON>'`")
    else:
        peers.start_python_backend(setup.procs, backend_port, args.events, args.load_core)
        setup.notes.append("non-streaming backend: bench/instant_backend.py (nginx not installed)")
    ports = start_proxies(setup, backend_port)
    script = write_wrk_script(setup.procs.workdir)
    for round_no in range(1, args.rounds + 1):
        for target, (port, group) in ports.items():
            figures = setup.figures[target]
            single = run_wrk(wrk, script, port, 1, args.duration, args.load_core)
            cpu_before = peers.group_cpu_seconds(group)
            many = run_wrk(wrk, script, port, 64, args.duration, args.load_core)
            if group is not None and many["requests"]:
                # CPU per request is steadier than requests/s where other work shares the machine.
                figures.cpu_us_c64.append((peers.group_cpu_seconds(group) - cpu_before) / many["requests"] * 1e6)
            figures.p50_ms.append(single["p50"])
            figures.p99_ms.append(single["p99"])
            figures.rps_c64.append(many["rps"])
            figures.errors += int(single["errors"] + many["errors"])
            print(
                f"  round {round_no} {target:14} c1 p50 {single['p50']:.3f} ms p99 {single['p99']:.3f} ms"
                f" | c64 {many['rps']:.0f} req/s"
                + (f", {figures.cpu_us_c64[-1]:.0f} us CPU/req" if group is not None else ""),
                flush=True,
            )


def streaming_phase(setup: Setup) -> None:
    args = setup.args
    backend_port = peers.free_port()
    if args.stream_backend == "fake":
        peers.start_fake_llama(setup.procs, backend_port, args.events, args.load_core)
        setup.notes.append(
            f"streaming backend: llmbalancer.testing.fake_llama (--token-delay 0, {args.events} tokens per stream)"
        )
    else:
        peers.start_python_backend(setup.procs, backend_port, args.events, args.load_core)
        setup.notes.append(
            f"streaming backend: bench/instant_backend.py (raw asyncio + uvloop, {args.events} chunks per stream,"
            " zero token delay)"
        )
    ports = start_proxies(setup, backend_port)
    for round_no in range(1, args.rounds + 1):
        for target, (port, _) in ports.items():
            figures = setup.figures[target]
            single = asyncio.run(run_streams("127.0.0.1", port, PATH, 1, args.duration))
            many = asyncio.run(run_streams("127.0.0.1", port, PATH, 64, args.duration))
            ttfc = sorted(single.first_event)
            figures.ttfc_p50_ms.append(statistics.median(ttfc) * 1000)
            figures.ttfc_p99_ms.append(ttfc[min(len(ttfc) - 1, int(len(ttfc) * 0.99))] * 1000)
            figures.ttfc_c64_p50_ms.append(statistics.median(many.first_event) * 1000)
            figures.chunks_c64.append(many.events_per_s)
            figures.errors += single.errors + many.errors
            expected = args.events + 1
            if args.stream_backend == "instant" and many.streams and many.events != many.streams * expected:
                setup.notes.append(
                    f"{target}: {many.events} chunks in {many.streams} streams, expected {expected} each"
                )
            print(
                f"  round {round_no} {target:14} stream c1 ttfc p50 {figures.ttfc_p50_ms[-1]:.3f} ms"
                f" | c64 {many.events_per_s:.0f} chunks/s ({many.streams} streams)",
                flush=True,
            )


# --- report -------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(setup: Setup, command: str) -> str:
    figures = setup.figures
    direct_p50 = median(_get(figures, DIRECT).p50_ms)
    lines = [
        "| target | p50 ms (c1) | p99 ms (c1) | added p50 ms | req/s (c64) | proxy CPU us/req (c64) | chunks/s (c64) | "
        "first chunk p50 ms (c1) | first chunk p99 ms (c1) | first chunk p50 ms (c64) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    added: dict[str, float | None] = {}
    for target in setup.targets:
        f = figures[target]
        p50 = median(f.p50_ms)
        added[target] = None if p50 is None or direct_p50 is None or target == DIRECT else p50 - direct_p50
        lines.append(
            f"| {target} | {_fmt(p50)} | {_fmt(median(f.p99_ms))} | {_fmt(added[target])} | "
            f"{_fmt(median(f.rps_c64), 0)} | {_fmt(median(f.cpu_us_c64), 0)} | {_fmt(median(f.chunks_c64), 0)} | "
            f"{_fmt(median(f.ttfc_p50_ms))} | "
            f"{_fmt(median(f.ttfc_p99_ms))} | {_fmt(median(f.ttfc_c64_p50_ms))} | {f.errors} |"
        )
    lines.append("")
    ours, theirs = added.get(LLMBALANCER), added.get(SGLANG)
    our_rps, their_rps = median(_get(figures, LLMBALANCER).rps_c64), median(_get(figures, SGLANG).rps_c64)
    if ours is not None and theirs is not None and theirs > 0:
        verdict = "met" if ours <= 1.5 * theirs else "NOT met"
        lines.append(
            f"- Added p50 latency, llmbalancer / sglang-router: {ours / theirs:.2f}x (target <= 1.5x: {verdict})"
        )
    if our_rps and their_rps:
        verdict = "met" if our_rps >= 0.5 * their_rps else "NOT met"
        lines.append(
            f"- Requests/s at c64, llmbalancer / sglang-router: {our_rps / their_rps:.2f} (target >= 0.5: {verdict})"
        )
    ngx_rps, ngx_added = median(_get(figures, NGINX).rps_c64), added.get(NGINX)
    if our_rps and ngx_rps:
        lines.append(f"- Requests/s at c64, llmbalancer / nginx: {our_rps / ngx_rps:.2f}")
    if ours is not None and ngx_added:
        lines.append(f"- Added p50 latency, llmbalancer / nginx: {ours / ngx_added:.2f}x")
    our_cpu, their_cpu = median(_get(figures, LLMBALANCER).cpu_us_c64), median(_get(figures, SGLANG).cpu_us_c64)
    if our_cpu and their_cpu:
        verdict = "met" if our_cpu <= their_cpu else "NOT met"
        lines.append(
            f"- Proxy CPU per request at c64, llmbalancer / sglang-router: {our_cpu / their_cpu:.2f}x"
            f" (issue 16 target <= 1.0x: {verdict})"
        )
    if ours is not None and theirs is not None and theirs > 0:
        verdict = "met" if ours <= 1.2 * theirs else "NOT met"
        lines.append(f"- Added p50 latency at c1, llmbalancer / sglang-router: {ours / theirs:.2f}x (issue 16 target"
                     f" <= 1.2x: {verdict})")
    our_chunks, their_chunks = median(_get(figures, LLMBALANCER).chunks_c64), median(_get(figures, SGLANG).chunks_c64)
    if our_chunks and their_chunks:
        lines.append(f"- Chunks/s at c64, llmbalancer / sglang-router: {our_chunks / their_chunks:.2f}")
    lines.append("")
    lines += [f"- {note}" for note in dict.fromkeys(setup.notes)]
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}, Linux {platform.release()}, Python {platform.python_version()}"


def versions(nginx: str | None) -> str:
    parts = []
    try:
        import aiohttp

        parts.append(f"aiohttp {aiohttp.__version__}")
    except ImportError:
        pass
    if nginx:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10).stderr.strip()
        parts.append(out.replace("nginx version: ", ""))
    if peers.sglang_router_available():
        from importlib.metadata import version

        parts.append(f"sglang-router {version('sglang-router')}")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=peers.ROOT, timeout=10
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "llmbalancer"], capture_output=True, text=True, cwd=peers.ROOT,
        timeout=10,
    ).stdout.strip()
    parts.append(f"llmbalancer at {commit or 'unknown commit'}{' + uncommitted changes' if dirty else ''}")
    return ", ".join(parts)


def _labelled_tree(text: str) -> tuple[str, Path]:
    label, sep, tree = text.partition("=")
    if not sep or not (Path(tree) / "llmbalancer" / "__main__.py").exists():
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=DIR, DIR a checkout holding llmbalancer/")
    return label, Path(tree).resolve()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=3, help="whole seconds per measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--events", type=int, default=100, help="SSE chunks per stream")
    parser.add_argument("--proxy-core", type=int, default=1, help="the core every proxy is pinned to")
    parser.add_argument("--load-core", type=int, default=0, help="the core for load generators and backends")
    parser.add_argument("--targets", default=f"{DIRECT},{LLMBALANCER},{NGINX},{SGLANG}", help="comma-separated")
    parser.add_argument("--skip-streaming", action="store_true")
    parser.add_argument(
        "--compare", action="append", default=[], type=_labelled_tree, metavar="LABEL=DIR",
        help="also measure llmbalancer from another checkout (e.g. a `git worktree` of an older commit)",
    )
    parser.add_argument(
        "--stream-backend", choices=("instant", "fake"), default="instant",
        help="SSE backend: bench/instant_backend.py (default, fastest) or the project's fake llama-server",
    )
    parser.add_argument(
        "--write-results", action="store_true", help=f"replace the proxy-overhead section of {results.RESULTS}"
    )
    return parser.parse_args()


def main() -> int:
    peers.stop_on_sigterm()
    args = parse_args()
    if len(os.sched_getaffinity(0)) < 2 or args.proxy_core == args.load_core:
        print("note: fewer than 2 usable cores; proxies and load share cores, figures will be pessimistic")
    cores = os.sched_getaffinity(0)
    if args.proxy_core not in cores or args.load_core not in cores:
        args.proxy_core = args.load_core = None  # cannot pin; run unpinned
    if args.load_core is not None:
        os.sched_setaffinity(0, {args.load_core})  # the streaming client runs in this process
    wrk = shutil.which("wrk")
    nginx = peers.nginx_available()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    at = targets.index(LLMBALANCER) + 1 if LLMBALANCER in targets else len(targets)
    targets[at:at] = [label for label, _ in args.compare]
    if NGINX in targets and not nginx:
        print("skipping nginx: not installed (Debian: apt-get install -y nginx)")
        targets.remove(NGINX)
    if SGLANG in targets and not peers.sglang_router_available():
        print("skipping sglang-router: not installed (.venv/bin/pip install sglang-router)")
        targets.remove(SGLANG)
    command = "python bench/proxy_overhead.py " + " ".join(sys.argv[1:])
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="llmb-bench-") as tmp:
        procs = peers.Processes(Path(tmp))
        setup = Setup(args, procs, nginx, targets, {t: Figures() for t in targets}, [])
        try:
            if wrk:
                print("non-streaming (wrk):", flush=True)
                non_streaming_phase(setup, wrk)
            else:
                print("skipping non-streaming figures: wrk not installed (Debian: apt-get install -y wrk)")
            procs.stop_all()
            if not args.skip_streaming:
                print("streaming:", flush=True)
                streaming_phase(setup)
        finally:
            procs.stop_all()
    table = report(setup, command)
    pinning = (
        f"each proxy pinned to core {args.proxy_core}; load generator and backends on core {args.load_core}"
        if args.proxy_core is not None else "unpinned"
    )
    text = "\n".join(
        [
            f"- Date: {started:%Y-%m-%d %H:%M} UTC",
            f"- Machine: {machine()}",
            f"- Versions: {versions(nginx)}",
            f"- Command: `{command.strip()}` ({args.rounds} rounds x {args.duration:g} s per measurement, "
            f"medians; {pinning})",
            "",
            table,
        ]
    )
    print()
    print(text)
    if args.write_results:
        results.write_section(SECTION, text)
        print(f"\nwritten to {results.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
