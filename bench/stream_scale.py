"""Stream scale: thousands of concurrent token streams through a proxy, side by side in one run.

A paced fake OpenAI backend (bench/paced_backend.py: 100 tokens at 10 tokens/s per stream, raw asyncio) is
reached directly, through nginx (least_conn, keep-alive upstream, ``proxy_buffering off``, 1 worker) and
through llmbalancer (its queue limit raised so that nothing is refused); ``llmbalancer-aiohttp`` is the
same daemon with ``server.relay: aiohttp`` (the relay before the lean one). For each concurrency level
(default 1,000, 2,000, 5,000, 10,000) every target gets a fresh proxy process and the same burst: that
many connections opened over ``--ramp`` seconds, one streamed chat completion each. Figures: wall time
until the last stream ended, chunks (SSE events) delivered per second of it, time to first token p50/p99,
errors (non-200, broken or short streams), and the proxy's CPU (seconds, and share of one core over the
wall) and peak RSS (sampled every 0.2 s). Proxies are pinned to ``--proxy-core``, the backend and this
process's client to ``--load-core``.

    python bench/stream_scale.py [--levels 1000,2000,5000,10000] [--targets direct,nginx,llmbalancer] [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
import results

SECTION = "stream-scale"
PATH = "/v1/chat/completions"
BODY = b'{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"stream":true,"max_tokens":100}'
DIRECT, NGINX, LLMB, LLMB_AIOHTTP = "direct", "nginx", "llmbalancer", "llmbalancer-aiohttp"
FD_LIMIT = 65536


@dataclass
class Outcome:
    level: int
    target: str
    wall: float = 0.0
    events: int = 0
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    short: int = 0
    cpu_s: float | None = None
    rss_mb: float | None = None
    first_error: str = ""

    @property
    def chunks_per_s(self) -> float:
        return self.events / self.wall if self.wall else 0.0

    def ttft_at(self, q: float) -> float | None:
        if not self.ttft:
            return None
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class _Client(asyncio.Protocol):
    """One connection, one streamed request; counts SSE events across reads, records the first one's time."""

    def __init__(self, request: bytes, started: float, tokens: int, done: asyncio.Future[None], out: Outcome) -> None:
        self._request = request
        self._started = started
        self._tokens = tokens
        self._done = done
        self._out = out
        self._head: bytes | None = None
        self._buffer = b""
        self._tail = b""
        self._events = 0
        self._first = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            self._buffer += data
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head, data = self._buffer[:end], self._buffer[end + 4 :]
            self._buffer = b""
            if not self._head.startswith(b"HTTP/1.1 200"):
                self._fail(self._head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
        if not data:
            return
        if self._first:
            self._first = False
            self._out.ttft.append(time.perf_counter() - self._started)
        joined = self._tail + data
        self._events += joined.count(b"data: {") - self._tail.count(b"data: {")
        self._tail = data[-16:]
        if joined.endswith(b"\r\n0\r\n\r\n"):  # the last chunk: the body ended
            if joined.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                self._finish()
            else:
                at = data.find(b"event: error")
                self._fail(data[at : at + 300].decode(errors="replace") if at >= 0 else "ended without [DONE]")

    def _finish(self) -> None:
        self._out.events += self._events
        if self._events < self._tokens:
            self._out.short += 1
        if self.transport is not None:
            self.transport.close()
        if not self._done.done():
            self._done.set_result(None)

    def _fail(self, why: str) -> None:
        self._out.errors += 1
        self._out.first_error = self._out.first_error or why
        self._out.events += self._events
        if self.transport is not None:
            self.transport.abort()
        if not self._done.done():
            self._done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._fail(f"connection lost after {self._events} events ({exc})")


async def burst(port: int, level: int, ramp: float, tokens: int, out: Outcome, limit: float) -> None:
    loop = asyncio.get_running_loop()
    request = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    started = time.perf_counter()

    pending: list[asyncio.Future[None]] = []

    async def one(index: int) -> None:
        await asyncio.sleep(ramp * index / level)
        done: asyncio.Future[None] = loop.create_future()
        pending.append(done)
        at = time.perf_counter()
        try:
            await loop.create_connection(lambda: _Client(request, at, tokens, done, out), "127.0.0.1", port)
        except OSError as exc:
            out.errors += 1
            out.first_error = out.first_error or f"connect: {exc}"
            return
        await done

    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*(one(i) for i in range(level)))
    except TimeoutError:
        unfinished = level - sum(1 for done in pending if done.done() and not done.cancelled())
        out.errors += unfinished
        out.first_error = out.first_error or f"{unfinished} streams not finished within {limit:g} s"
    out.wall = time.perf_counter() - started
    out.errors += out.short


class _Sampler(threading.Thread):
    """Peak RSS of a process group, sampled every 0.2 s."""

    def __init__(self, group: int) -> None:
        super().__init__(daemon=True)
        self._group = group
        self._halt = threading.Event()
        self.peak_kb = 0

    def run(self) -> None:
        while not self._halt.wait(0.2):
            self.peak_kb = max(self.peak_kb, _group_rss_kb(self._group))

    def stop(self) -> float:
        self._halt.set()
        self.join()
        self.peak_kb = max(self.peak_kb, _group_rss_kb(self._group))
        return self.peak_kb / 1024


def _group_rss_kb(group: int) -> int:
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != group:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def start_target(procs: peers.Processes, target: str, backend_port: int, core: int | None, nginx: str | None) -> int:
    port = peers.free_port()
    if target == NGINX:
        assert nginx is not None
        process = peers.start_nginx_least_conn(
            procs, nginx, f"nginx-{port}", port, [backend_port], core, worker_connections=4 * FD_LIMIT // 8,
            access_log=True, backlog=4096,  # as llmbalancer's
        )
    else:
        env = {
            "LLMBALANCER_QUEUE__MAX_SIZE": "1000000",
            "LLMBALANCER_SERVER__RELAY": "aiohttp" if target == LLMB_AIOHTTP else "lean",
        }
        process = peers.start_llmbalancer(procs, port, backend_port, core, name=f"{target}-{port}", env=env)
    peers.wait_http(f"http://127.0.0.1:{port}/health", process, 60)
    if target != NGINX:
        time.sleep(1.5)  # the first probes decide the backend's kind (it is asked for usage, as vLLM is)
    return port


def measure(args: argparse.Namespace, procs: peers.Processes, backend_port: int, nginx: str | None) -> list[Outcome]:
    outcomes: list[Outcome] = []
    most = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) // 2  # a proxy holds two sockets per stream
    for asked in args.levels:
        level = min(asked, most)
        if level < asked:
            print(f"  {asked} streams: the file-descriptor limit allows a proxy {level}; measuring {level}")
        for round_no in range(args.rounds):
            for target in args.targets:
                out = Outcome(level, target)
                if target == DIRECT:
                    port, group = backend_port, None
                else:
                    port = start_target(procs, target, backend_port, args.proxy_core, nginx)
                    group = procs.last_pid()
                sampler = _Sampler(group) if group is not None else None
                if sampler is not None:
                    sampler.start()
                cpu_before = peers.group_cpu_seconds(group)
                limit = args.tokens / args.rate + 60
                asyncio.run(burst(port, level, args.ramp, args.tokens, out, limit))
                if group is not None and sampler is not None:
                    out.cpu_s = peers.group_cpu_seconds(group) - cpu_before
                    out.rss_mb = sampler.stop()
                    procs.stop_pid(group)
                outcomes.append(out)
                print(f"  {level:6} {target:20} round {round_no + 1}: {_row(out)}", flush=True)
                time.sleep(1.0)
    return outcomes


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _row(o: Outcome) -> str:
    cpu = f"{o.cpu_s:.1f} s ({o.cpu_s / o.wall * 100:.0f} %)" if o.cpu_s is not None and o.wall else "n/a"
    p50, p99 = o.ttft_at(0.5), o.ttft_at(0.99)
    return (
        f"wall {o.wall:.1f} s, {o.chunks_per_s / 1000:.1f}k chunks/s, TTFT {_fmt(p50, 2)} / {_fmt(p99, 2)} s, "
        f"errors {o.errors}{' (' + o.first_error + ')' if o.first_error else ''}, CPU {cpu}, "
        f"RSS {_fmt(o.rss_mb, 0)} MB"
    )


def report(outcomes: list[Outcome]) -> str:
    lines = [
        "| streams | target | wall s | chunks/s | TTFT p50 s | TTFT p99 s | errors | proxy CPU s (share of a core) "
        "| proxy peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        cpu = f"{o.cpu_s:.1f} ({o.cpu_s / o.wall * 100:.0f} %)" if o.cpu_s is not None and o.wall else "n/a"
        lines.append(
            f"| {o.level:,} | {o.target} | {o.wall:.1f} | {o.chunks_per_s / 1000:.1f}k | {_fmt(o.ttft_at(0.5), 2)} | "
            f"{_fmt(o.ttft_at(0.99), 2)} | {o.errors} | {cpu} | {_fmt(o.rss_mb, 0)} |"
        )
    lines.append("")
    lines += verdicts(outcomes)
    return "\n".join(lines)


def verdicts(outcomes: list[Outcome]) -> list[str]:
    def best(level: int, target: str) -> Outcome | None:
        rows = [o for o in outcomes if o.level == level and o.target == target]
        return sorted(rows, key=lambda o: o.wall)[(len(rows) - 1) // 2] if rows else None  # the median round

    out = []
    ours, theirs = best(5000, LLMB), best(5000, NGINX)
    if ours is not None and theirs is not None and theirs.wall:
        wall = ours.wall / theirs.wall
        chunks = ours.chunks_per_s / theirs.chunks_per_s if theirs.chunks_per_s else 0.0
        p99, their_p99 = ours.ttft_at(0.99), theirs.ttft_at(0.99)
        ttft = p99 / their_p99 if p99 is not None and their_p99 else None
        met = wall <= 1.1 and chunks >= 0.9 and ttft is not None and ttft <= 1.5 and ours.errors == 0
        out.append(
            f"- 5,000 streams, llmbalancer / nginx: wall {wall:.2f}x, chunks/s {chunks:.2f}x, TTFT p99 "
            f"{_fmt(ttft, 2)}x, errors {ours.errors} (targets: within 10 %, within 10 %, <= 1.5x, 0): "
            f"{'met' if met else 'NOT met'}"
        )
    big = best(max(o.level for o in outcomes), LLMB) if outcomes else None
    if big is not None and big.rss_mb is not None:
        out.append(f"- {big.level:,} streams, llmbalancer peak RSS {big.rss_mb:.0f} MB (target at 10,000: < 1024 MB): "
                   f"{'met' if big.rss_mb < 1024 and big.errors == 0 else 'NOT met'}")
    return out


def _raise_fd_limit() -> None:
    """Both ends of every stream live on this machine: raise this process's limit (its children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT if hard == resource.RLIM_INFINITY else max(hard, FD_LIMIT)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # raising the hard limit needs root
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"file descriptors: {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} (was {soft})")


def main() -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1000,2000,5000,10000", help="concurrent streams, comma-separated")
    parser.add_argument("--targets", default=f"{DIRECT},{NGINX},{LLMB}", help=f"also: {LLMB_AIOHTTP}")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="tokens per second per stream")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which a level's connections open")
    parser.add_argument("--proxy-core", type=int, default=1)
    parser.add_argument("--load-core", type=int, default=0)
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--section", default=SECTION, help="the section of bench/RESULTS.md to (re)write")
    args = parser.parse_args()
    args.levels = [int(v) for v in args.levels.split(",")]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    _raise_fd_limit()
    cores = os.sched_getaffinity(0)
    if args.proxy_core not in cores or args.load_core not in cores:
        args.proxy_core = args.load_core = None
    else:
        os.sched_setaffinity(0, {args.load_core})
    nginx = peers.nginx_available()
    if NGINX in args.targets and not nginx:
        print("skipping nginx: not installed (apt-get install -y nginx)")
        args.targets.remove(NGINX)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    started = datetime.datetime.now(datetime.UTC)
    machine = results.machine()
    command = "python bench/stream_scale.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="llmb-scale-") as tmp:
        procs = peers.Processes(Path(tmp))
        try:
            backend_port = peers.free_port()
            backend = procs.start(
                "paced-backend",
                [sys.executable, str(peers.HERE / "paced_backend.py"), "--port", str(backend_port),
                 "--tokens", str(args.tokens), "--rate", str(args.rate)],
                args.load_core,
            )
            peers.wait_http(f"http://127.0.0.1:{backend_port}/health", backend, 10)
            outcomes = measure(args, procs, backend_port, nginx)
        finally:
            procs.stop_all()
    text = "\n".join([
        f"`{command.strip()}` — {started:%Y-%m-%d %H:%M} UTC, {machine}."
        f" {args.tokens} tokens per stream at {args.rate:g}/s, connections opened over {args.ramp:g} s;"
        f" proxies pinned to core {args.proxy_core}, backend and client on core {args.load_core}.",
        "",
        report(outcomes),
    ])
    print()
    print(text)
    if args.write_results:
        results.write_section(args.section, text)
        print(f"\nwritten to {results.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
