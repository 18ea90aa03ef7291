"""The command line as a newcomer meets it: help that lists every command and shows examples, output that
goes quietly into a closed pipe, and a warning when ``serve`` has no fleet to balance."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmbalancer.cli import _parser
from tests.support import free_port, make_config, run_balancer

CLI = [sys.executable, "-m", "llmbalancer"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    [commands] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def _clean_env() -> dict[str, str]:
    """No LLMBALANCER_* or SERVER_LIST_JSON from the environment running the tests, a terminal 80 wide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMBALANCER_") and k != "SERVER_LIST_JSON"}
    return {**env, "COLUMNS": "80"}


def _help(*args: str) -> str:
    run = subprocess.run([*CLI, *args, "--help"], capture_output=True, text=True, timeout=30, env=_clean_env())
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    return run.stdout


def test_top_level_help_lists_every_command_on_one_line_each() -> None:
    out = _help()
    assert "``" not in out  # plain text, not the module docstring's reStructuredText
    listing = out[out.index("commands:") :].splitlines()
    for name, parser in _commands().items():
        [line] = [line for line in listing if line.split()[:1] == [name]]
        assert len(line.split()) > 1, f"{name}'s summary is not on its line"
        assert parser.description, f"{name} has no description"
    assert "examples:" in out


@pytest.mark.parametrize("command", sorted(_commands()))
def test_each_command_has_help_with_a_description_and_examples(command: str) -> None:
    out = _help(command)
    assert out.startswith(f"usage: llmbalancer {command}")
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 10, description  # says what it does, not just its name
    assert "example" in out
    assert f"llmbalancer {command}" in out[out.index("example") :]  # a command line to copy


def _into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with stdout a pipe nobody reads (``| head -1`` after head has exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*CLI, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30,
                              env=_clean_env())
    finally:
        os.close(write_end)


async def test_status_json_into_a_closed_pipe_exits_without_a_traceback() -> None:
    async with run_balancer(make_config([])) as balancer:
        run = await asyncio.to_thread(_into_a_closed_pipe, "status", "--json", "--url", balancer.url)
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
    assert run.stderr == ""
    assert run.returncode == 1


def test_check_config_and_help_into_a_closed_pipe_exit_without_a_traceback(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("server:\n  port: 9000\n")
    run = _into_a_closed_pipe("check-config", str(config_file))
    assert run.stderr == "", run.stderr
    assert run.returncode == 1
    run = _into_a_closed_pipe("--help")  # argparse itself ignores the failed write: exit 0
    assert run.stderr == "", run.stderr


def test_serve_without_any_fleet_source_warns_once_naming_the_ways_to_give_one(tmp_path: Path) -> None:
    # Outside the repository: no llamafile_commands.txt in the working directory.
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*CLI, "serve", "--port", str(free_port()), "--log-format", "json"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(),
        )
        try:
            deadline = time.monotonic() + 20
            while '"listening"' not in log_path.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text()
                time.sleep(0.05)
        finally:
            process.terminate()
            process.wait(timeout=30)
    warnings = [line for line in log_path.read_text().splitlines() if '"no_backends"' in line]
    assert len(warnings) == 1, log_path.read_text()
    [warning] = warnings
    assert '"level":"warning"' in warning.replace(" ", "")
    for way in ("--backend URL", "--backends-file", "--commands FILE", "--server-list", "backends:", "instances:"):
        assert way in warning


def test_serve_with_a_backend_does_not_warn(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*CLI, "serve", "--port", str(free_port()), "--log-format", "json",
             "--backend", f"http://127.0.0.1:{free_port()}"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(),
        )
        try:
            deadline = time.monotonic() + 20
            while '"listening"' not in log_path.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text()
                time.sleep(0.05)
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert '"listening"' in log_path.read_text()
    assert '"no_backends"' not in log_path.read_text()


def test_status_tells_requests_waiting_inside_a_server_from_the_balancers_queue() -> None:
    from llmbalancer.status import format_table

    backend = {"name": "a", "state": "healthy", "routable": True, "in_flight": 2, "slots_total": 2, "slots_busy": 2}
    snapshot = {"policy": "slot_aware", "queue": {"depth": 5, "capacity": 100}, "gpu": {},
                "backends": [{**backend, "deferred": 3, "queue_depth": 3}, {**backend, "name": "b", "queue_depth": 4}]}
    summary, columns, a, b = format_table(snapshot).splitlines()
    assert "balancer queue 5/100" in summary
    position = columns.index("SERVER-QUEUE")
    assert a[position] == "3"
    assert b[position] == "4"  # a snapshot from before the field was named `deferred`
