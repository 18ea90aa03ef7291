"""`python -m llmbalancer serve --commands F` leaves no child process behind, however it is stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.supervisor_support import HEALTHY_CHILD, child_command, kill_quietly, wait_gone, write_child
from tests.support import balancer_process, free_port


def _running_pids(port: int, count: int, timeout: float = 20.0) -> list[int]:
    """The pids of the supervised instances, once ``count`` of them are running (bounded)."""
    deadline = time.monotonic() + timeout
    instances: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/instances", timeout=2) as reply:
                instances = json.load(reply)["instances"]
            pids = [int(str(i["pid"])) for i in instances if i["state"] == "running" and i["pid"]]
            if len(pids) == count:
                return pids
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{count} instances not running within {timeout} s; last seen: {instances}")


def _serve_two_children(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    script = write_child(tmp_path, "child.py", HEALTHY_CHILD)
    commands = tmp_path / "commands.txt"
    commands.write_text(f"{child_command(script, free_port())}\n{child_command(script, free_port())}\n")
    port = free_port()
    process = balancer_process(
        ["serve", "--commands", str(commands), "--port", str(port), "--log-format", "json"],
        env={"LLMBALANCER_SUPERVISOR__OUTPUT_DIR": str(tmp_path / "outputs")},
    )
    return process, port


def _stop_all(process: subprocess.Popen[bytes], pids: list[int]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    assert process.stdout is not None
    process.stdout.close()
    kill_quietly(pids)


def test_sigterm_to_the_balancer_stops_every_child(tmp_path: Path) -> None:
    process, port = _serve_two_children(tmp_path)
    pids: list[int] = []
    try:
        pids = _running_pids(port, 2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert wait_gone(pids, timeout=5) == []
    finally:
        _stop_all(process, pids)


def test_sigkill_to_the_balancer_leaves_no_child_behind(tmp_path: Path) -> None:
    process, port = _serve_two_children(tmp_path)
    pids: list[int] = []
    try:
        pids = _running_pids(port, 2)
        process.kill()  # no handler runs: only the kernel's parent-death signal can stop the children
        process.wait(timeout=10)
        assert wait_gone(pids, timeout=5) == []
    finally:
        _stop_all(process, pids)
