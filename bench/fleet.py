"""The scheduling benchmark's processes: a fleet of fake llama-servers and, in front of it, llmbalancer
or a peer (nginx ``least_conn``, HAProxy ``leastconn``, sglang-router ``cache_aware``).

Process handling (own session, SIGTERM then SIGKILL, logs in the work directory) is ``peers.Processes``,
shared with the proxy-overhead benchmark; this module only knows how to configure each for a fleet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import peers

MODEL = "smollm2"  # the fake's alias


@dataclass(frozen=True)
class ServerSpec:
    """One simulated llama-server. ``speed`` divides its rates: 2.0 = prefill and decode take twice as long."""

    slots: int
    speed: float


@dataclass(frozen=True)
class SimParams:
    token_delay: float  # seconds per generated token with one busy slot
    prefill_per_token: float  # seconds per uncached prompt token
    batch_slowdown: float  # k: decode step = token_delay * (1 + k * (busy - 1))
    n_ctx: int


def start_fleet(procs: peers.Processes, specs: list[ServerSpec], sim: SimParams) -> list[int]:
    """Start one fake llama-server process per spec (in parallel); return their ports once all answer."""
    started: list[tuple[int, subprocess.Popen[bytes]]] = []
    for i, spec in enumerate(specs):
        port = peers.free_port()
        command = [
            sys.executable, "-m", "llmbalancer.testing.fake_llama", "--port", str(port),
            "--slots", str(spec.slots),
            "--token-delay", f"{sim.token_delay * spec.speed:g}",
            "--prefill-per-token", f"{sim.prefill_per_token * spec.speed:g}",
            "--batch-slowdown", f"{sim.batch_slowdown:g}",
            "--n-ctx", str(sim.n_ctx), "--alias", MODEL, "--record-timeline",
        ]
        started.append((port, procs.start(f"fake-{i}", command, None)))
    for port, process in started:
        peers.wait_http(f"http://127.0.0.1:{port}/health", process, 30)
    return [port for port, _ in started]


def fake_stats(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/stats", timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def start_llmbalancer(
    procs: peers.Processes, port: int, backends: list[int], policy: str | None, tree: Path = peers.ROOT,
    env: dict[str, str] | None = None,
) -> None:
    """``policy`` None: the default policy; ``tree``: the checkout to run (another commit's, to compare);
    ``env``: settings as ``LLMBALANCER_*`` variables."""
    command = [sys.executable, "-m", "llmbalancer", "serve", "--port", str(port), "--log-format", "json"]
    if policy is not None:
        command += ["--policy", policy]
    for i, backend in enumerate(backends):
        command += ["--backend", f"http://127.0.0.1:{backend}=s{i}"]
    process = procs.start("llmbalancer", command, None, cwd=tree, env=env)
    # Ready when every backend is healthy with its slot count polled (the capacity gate needs it).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llmbalancer exited:\n{procs.log_tail('llmbalancer')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/llmhealth-snapshot", timeout=2) as response:
                snapshot = json.loads(response.read())
            found = snapshot.get("backends", [])
            if len(found) == len(backends) and all(b["state"] == "healthy" and b["slots_total"] for b in found):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llmbalancer's backends not all healthy within 30 s:\n{procs.log_tail('llmbalancer')}")


def start_nginx(procs: peers.Processes, port: int, backends: list[int]) -> None:
    nginx = peers.nginx_available()
    if nginx is None:
        raise RuntimeError("nginx not installed (apt-get install -y nginx)")
    # What a user would write for SSE in front of llama-servers; a long prefill is silent, hence the timeout.
    process = peers.start_nginx_least_conn(
        procs, nginx, "nginx-sched", port, backends, None, keepalive=64, read_timeout_s=300
    )
    peers.wait_http(f"http://127.0.0.1:{port}/health", process, 20)


def haproxy_available() -> str | None:
    return shutil.which("haproxy") or (shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))


def start_haproxy(procs: peers.Processes, port: int, backends: list[int]) -> None:
    haproxy = haproxy_available()
    if haproxy is None:
        raise RuntimeError("haproxy not installed (apt-get install -y haproxy)")
    servers = "\n".join(f"    server s{i} 127.0.0.1:{b}" for i, b in enumerate(backends))
    conf = procs.workdir / "haproxy.cfg"
    # Defaults plus what a user sets for SSE: long server timeout (a long prefill is silent) and
    # http-no-delay (send each small chunk at once rather than merging packets).
    conf.write_text(
        f"""global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option http-no-delay
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance leastconn
{servers}
"""
    )
    process = procs.start("haproxy", [haproxy, "-db", "-f", str(conf)], None)
    peers.wait_http(f"http://127.0.0.1:{port}/health", process, 20)


def start_sglang(procs: peers.Processes, port: int, backends: list[int]) -> None:
    if not peers.sglang_router_available():
        raise RuntimeError("sglang-router not installed (pip install sglang-router)")
    command = [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
        # its metrics port (default 29000) may be taken by another run on the machine
        "--policy", "cache_aware", "--prometheus-port", str(peers.free_port()),
        "--worker-urls", *[f"http://127.0.0.1:{b}" for b in backends],
    ]
    process = procs.start("sglang-router", command, None)
    peers.wait_http(f"http://127.0.0.1:{port}/v1/models", process, 60)
