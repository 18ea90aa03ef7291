"""A real Redis for the replicas tests: Debian's ``redis-server``, started on a free loopback port with no
persistence, stopped by the test that started it (``scripts/test.sh`` installs the package)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import RunningBalancer, free_port, make_config, run_balancer, wait_for


def _redis_server() -> str:
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found is None:
        pytest.fail("redis-server is not installed (scripts/test.sh installs Debian's redis-server)")
    return found


@dataclass
class RedisServer:
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or start again, on the same port: a Redis that comes back empty)."""
        assert self.process is None or self.process.poll() is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@contextlib.contextmanager
def running_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def two_replicas(
    redis: RedisServer, backends: list[str], **overrides: Any
) -> AsyncIterator[tuple[RunningBalancer, RunningBalancer]]:
    """Replicas "A" and "B" of one balancer, in this process, sharing ``redis``; yielded once both joined."""
    settings = {"state.url": redis.url, **overrides}
    async with (
        run_balancer(make_config(backends, **settings, **{"state.replica": "A"})) as a,
        run_balancer(make_config(backends, **settings, **{"state.replica": "B"})) as b,
    ):
        for replica in (a, b):
            await wait_for(lambda r=replica: r.components.replicas.store.up, timeout=5)  # type: ignore[union-attr]
        yield a, b
