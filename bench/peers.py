"""Start the benchmark's processes (backends and proxies), each pinned to a core, and stop them all.

Every process runs in its own session so that stopping it stops its children (nginx's worker, the
router's threads); stopping is SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Owns every process started by the benchmark; ``stop_all`` in a ``finally``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, command: list[str], core: int | None, cwd: Path = ROOT, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``env``: variables added to this process's environment."""
        log = (self.workdir / f"{name}.log").open("wb")

        def pin() -> None:
            if core is not None:
                os.sched_setaffinity(0, {core})

        try:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=pin, cwd=cwd, env={**os.environ, **env} if env else None,
            )
        finally:
            log.close()
        self._running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        # A process group can outlive its leader (nginx workers): make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        self._running = [(n, p) for n, p in self._running if p is not process]

    def last_pid(self) -> int:
        """The process group (and pid) of the process started last."""
        return self._running[-1][1].pid

    def stop_pid(self, pid: int) -> None:
        for _, process in list(self._running):
            if process.pid == pid:
                self.stop(process)

    def stop_all(self) -> None:
        for _, process in reversed(list(self._running)):
            self.stop(process)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def group_cpu_seconds(group: int | None) -> float:
    """User + system CPU time of every live process in a process group (a proxy and its workers)."""
    if group is None:
        return 0.0
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group:  # pgrp; fields[11], fields[12]: utime, stime
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float, post: bytes | None = None) -> None:
    """Wait until ``url`` answers 200 (POST ``post`` if given), failing early if the process died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before answering {url}")
        request = urllib.request.Request(url, data=post, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                response.read()
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s ({last})")


def nginx_available() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def sglang_router_available() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


def _nginx_conf(workdir: Path, name: str, http_body: str, worker_connections: int = 4096) -> Path:
    base = workdir / name
    base.mkdir(exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {base}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = base / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
worker_rlimit_nofile {2 * worker_connections + 64};
events {{ worker_connections {worker_connections}; }}
http {{
{temp_paths}
    keepalive_requests 1000000;
{http_body}
}}
"""
    )
    return conf


def start_nginx_backend(procs: Processes, nginx: str, port: int, body: bytes, core: int | None) -> None:
    """nginx answering every request with a fixed JSON body: the fastest instant backend there is."""
    quoted = body.decode().replace("\\", "\\\\").replace("'", "\\'")
    conf = _nginx_conf(
        procs.workdir, "nginx-backend",
        f"""    access_log off;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        default_type application/json;
        location / {{ return 200 '{quoted}'; }}
    }}""",
    )
    process = procs.start("nginx-backend", [nginx, "-c", str(conf), "-e", str(conf.parent / "error.log")], core)
    wait_http(f"http://127.0.0.1:{port}/health", process, 10)


def start_python_backend(procs: Processes, port: int, events: int, core: int | None) -> None:
    process = procs.start(
        f"instant-backend-{port}",
        [sys.executable, str(HERE / "instant_backend.py"), "--port", str(port), "--events", str(events)],
        core,
    )
    wait_http(f"http://127.0.0.1:{port}/health", process, 10)


def start_fake_llama(procs: Processes, port: int, events: int, core: int | None) -> None:
    """The project's faithful fake (aiohttp), zero token delay and a slot per connection."""
    process = procs.start(
        f"fake-llama-{port}",
        [
            sys.executable, "-m", "llmbalancer.testing.fake_llama", "--port", str(port), "--slots", "128",
            "--token-delay", "0", "--max-tokens-default", str(events), "--alias", "bench",
        ],
        core,
    )
    wait_http(f"http://127.0.0.1:{port}/health", process, 20)


def start_nginx_least_conn(
    procs: Processes, nginx: str, name: str, port: int, backend_ports: list[int], core: int | None,
    *, keepalive: int = 256, read_timeout_s: int | None = None, worker_connections: int = 4096,
    access_log: bool = True, backlog: int = 1024,
) -> subprocess.Popen[bytes]:
    """nginx as a user configures it in front of streaming servers: least_conn, keep-alive upstream,
    no response buffering (and, for silent prefills, a long read timeout)."""
    base = procs.workdir / name
    servers = "\n".join(f"        server 127.0.0.1:{b};" for b in backend_ports)
    read_timeout = f"\n            proxy_read_timeout {read_timeout_s}s;" if read_timeout_s else ""
    conf = _nginx_conf(
        procs.workdir, name,
        f"""    access_log {f"{base}/access.log" if access_log else "off"};
    upstream backends {{
        least_conn;
{servers}
        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;{read_timeout}
        }}
    }}""",
        worker_connections,
    )
    return procs.start(name, [nginx, "-c", str(conf), "-e", str(base / "error.log")], core)


def start_nginx_proxy(
    procs: Processes, nginx: str, port: int, backend_port: int, core: int | None
) -> subprocess.Popen[bytes]:
    return start_nginx_least_conn(procs, nginx, "nginx-proxy", port, [backend_port], core)


def start_llmbalancer(
    procs: Processes, port: int, backend_port: int, core: int | None, name: str = "llmbalancer", tree: Path = ROOT,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``tree``: the checkout to run (``python -m`` imports the package from its working directory)."""
    # Default access logging stays on (one JSON line per request, to the log file): part of the real cost.
    return procs.start(
        name,
        [
            sys.executable, "-m", "llmbalancer", "serve", "--backend", f"http://127.0.0.1:{backend_port}",
            "--port", str(port), "--log-format", "json",
        ],
        core,
        cwd=tree,
        env={**os.environ, **env} if env else None,
    )


def start_sglang_router(procs: Processes, port: int, backend_port: int, core: int | None) -> subprocess.Popen[bytes]:
    return procs.start(
        "sglang-router",
        [
            sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", f"http://127.0.0.1:{backend_port}", "--policy", "round_robin",
        ],
        core,
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # `timeout` signals the child and then its whole group: ignore the second copy, or it would land
    # inside the clean-up and leave processes behind.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop every process started


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``timeout``) unwind like Ctrl-C, so a bench stops the fleet it started (Python's
    default SIGTERM ends the process at once and leaves its servers running)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
