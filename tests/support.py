"""Shared test helpers: free ports, real llama-server processes, an in-process balancer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from llmbalancer.app import COMPONENTS, Components, build_app
from llmbalancer.config import Config
from llmbalancer.configure import load_config
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.registry import Registry
from llmbalancer.relay.connection import app_runner
from llmbalancer.reloading import ConfigSource
from llmbalancer.scheduling.claims import Claim
from llmbalancer.scheduling.selectors import RequestFacts
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from llmbalancer.supervisor.rig import expected_paths

REPO = Path(__file__).resolve().parent.parent


def occupy(registry: Registry, backend: Backend) -> Claim:
    """A slot on ``backend`` held as a request in flight holds it (release it, or leave its ``with``)."""
    return Claim(registry, SlotAware(), backend, RequestFacts("POST", "/v1/chat/completions", "test"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LlamaServer:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def llama_server_command(
    port: int, slots: int = 2, alias: str | None = "smollm2", extra: Sequence[str] = ()
) -> list[str]:
    paths = expected_paths()
    if not paths.llama_server.exists() or not paths.model.exists():
        raise RuntimeError("llama-server is not installed: run `python -m llmbalancer install-llama-server`")
    return [
        str(paths.llama_server), "-m", str(paths.model), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-t", "1", "-c", str(2048 * slots), "--metrics", *(["-a", alias] if alias else []),
        *extra,
    ]


def start_llama_server(
    tmp_dir: Path, port: int | None = None, slots: int = 2, alias: str | None = "smollm2", extra: Sequence[str] = ()
) -> LlamaServer:
    port = port or free_port()
    log_path = tmp_dir / f"llama-{port}.log"
    with log_path.open("wb") as log:
        command = llama_server_command(port, slots, alias, extra)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return LlamaServer(port, process, log_path)


def wait_ready(url: str, timeout: float = 60.0) -> None:
    """Block until GET url/health answers 200 (bounded)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout} s")


@contextlib.contextmanager
def real_fleet(tmp_dir: Path, count: int = 2) -> Iterator[list[LlamaServer]]:
    servers = [start_llama_server(tmp_dir) for _ in range(count)]
    try:
        for server in servers:
            wait_ready(server.url)
        yield servers
    finally:
        for server in servers:
            server.stop()


@dataclass
class RunningBalancer:
    url: str
    port: int
    components: Components
    config: Config


def make_config(backends: list[str], **overrides: Any) -> Config:
    values: dict[str, Any] = {"backends": backends, "logging.format": "json", "health.interval": 0.2}
    values.update(overrides)
    return load_config(environ={}, overrides=values)


@contextlib.asynccontextmanager
async def run_balancer(config: Config, source: ConfigSource | None = None) -> AsyncIterator[RunningBalancer]:
    """The real app on a real socket, as `serve` runs it (its runner: handler cancellation on, the client
    connection's deadlines); ``source``: what ``config`` was loaded from, for reloads."""
    app = build_app(config, source)
    runner = app_runner(app, config.server, shutdown_timeout=5)
    await runner.setup()
    port = free_port()
    tls = app[COMPONENTS].tls  # server.tls_cert: HTTPS, as `serve` binds it
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls.context if tls is not None else None)
    await site.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield RunningBalancer(f"{scheme}://127.0.0.1:{port}", port, app[COMPONENTS], config)
    finally:
        await runner.cleanup()


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:  # noqa: ASYNC109 - a bounded test poll, not an API
    """Await until predicate() is truthy (bounded in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise TimeoutError("condition not met in time")


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as reply:
        return await reply.json(content_type=None)


def balancer_process(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m llmbalancer ...` as a child process (for signal and CLI tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "llmbalancer", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
