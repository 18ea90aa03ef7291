"""Fake llama-servers as real processes, for tests that stop a backend the way an operator would.

(Stopping an in-process fake while the balancer's health poller is connecting to it can leave an
accepted socket behind, which `filterwarnings = error` turns into a failure; a process exits clean.)
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO, LlamaServer, free_port, wait_ready


def start_fake_process(tmp_dir: Path, slots: int = 2) -> LlamaServer:
    port = free_port()
    log_path = tmp_dir / f"fake-llama-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmbalancer.testing.fake_llama", "--port", str(port), "--slots", str(slots)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
    return LlamaServer(port, process, log_path)


@contextlib.contextmanager
def fake_fleet_processes(tmp_dir: Path, count: int = 2) -> Iterator[list[LlamaServer]]:
    servers: list[LlamaServer] = []
    try:
        for _ in range(count):
            servers.append(start_fake_process(tmp_dir))
        for server in servers:
            wait_ready(server.url, timeout=20)
        yield servers
    finally:
        for server in servers:
            server.stop()
