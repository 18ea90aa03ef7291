"""Tiny child processes for supervisor tests: a server that answers /health, and a crash-looping one."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

# Answers every GET with 200 and {"status":"ok"} on --port; prints a line so its log shows it ran.
HEALTHY_CHILD = """\
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("child serving on", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

CRASHING_CHILD = """\
import sys
print("fatal: cannot load model (simulated)", flush=True)
sys.exit(3)
"""


def write_child(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def child_command(script: Path, port: int) -> str:
    return f"{sys.executable} {script} --port {port}"


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait (bounded) for the processes to end; returns those still running."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not process_gone(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def kill_quietly(pids: list[int]) -> None:
    for pid in pids:
        if not process_gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
