"""The command line: check-config prints the effective configuration or every problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmbalancer.cli import main
from tests.support import REPO


def test_check_config_prints_the_effective_configuration(tmp_path: Path) -> None:
    backends = tmp_path / "backends.txt"
    backends.write_text("# fleet\nhttp://127.0.0.1:8081=one\n")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"server:\n  port: 9000\npolicy:\n  name: hash\nbackends_file: {backends}\n")
    run = subprocess.run(
        [sys.executable, "-m", "llmbalancer", "check-config", str(config_file)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert run.returncode == 0, run.stderr
    effective = yaml.safe_load(run.stdout)
    assert effective["server"] == {"host": "127.0.0.1", "port": 9000, "max_body_bytes": 16 * 1024 * 1024,
                                   "drain_timeout": 30.0, "keepalive_timeout": 75.0, "header_timeout": 60.0,
                                   "body_timeout": 60.0, "relay": "lean", "tls_cert": None, "tls_key": None}
    assert effective["policy"]["name"] == "hash"
    assert effective["backends"][0]["name"] == "one"
    assert effective["timeouts"]["connect"] == 5.0  # defaults are printed too


def test_check_config_exits_non_zero_naming_every_bad_key_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("server:\n  port: 70000\nretries:\n  attempts: 0\n  backoff: 1\n")
    assert main(["check-config", str(config_file)]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "server.port (line 2)" in captured.err
    assert "retries.attempts (line 4)" in captured.err
    assert "retries.backoff (line 5)" in captured.err


def test_check_config_on_a_missing_file_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "/nonexistent/llmbalancer.yaml"]) != 0
    assert "cannot read /nonexistent/llmbalancer.yaml" in capsys.readouterr().err


def test_unknown_policy_flag_is_refused_before_serving(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--policy", "fastest", "--backend", "http://127.0.0.1:1"]) != 0
    assert "policy.name" in capsys.readouterr().err


def _check_config(config_file: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmbalancer", "check-config", str(config_file)],
        cwd=REPO, capture_output=True, text=True, timeout=30, env={**os.environ, **environ},
    )


def test_check_config_expands_variables_in_instance_commands_from_the_environment(tmp_path: Path) -> None:
    server = tmp_path / "bin" / "llama-server"
    server.parent.mkdir()
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("instances:\n  - command: ${SERVERS}/llama-server --port 9100\n")
    run = _check_config(config_file, SERVERS=str(server.parent), LLMBALANCER_PORT="1")
    assert run.returncode == 0, run.stderr
    effective = yaml.safe_load(run.stdout)
    assert effective["instances"][0]["command"] == [str(server), "--port", "9100"]
    assert effective["server"]["port"] == 8088  # the file alone: LLMBALANCER_* is not laid over it


def test_check_config_reports_a_missing_executable_or_an_undefined_variable_by_key_and_line(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "instances:\n"
        "  - command: no-such-llama-server --port 9100\n"
        "  - command: ${NO_SUCH_VARIABLE}/llama-server --port 9101\n"
        "  - command: [/bin/sh, -c, 'exit 0', --port, '9102']\n"
    )
    run = _check_config(config_file)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines()[1:] == [
        "  - instances[0].command (line 2): executable 'no-such-llama-server' not found on PATH",
        "  - instances[1].command (line 3): undefined environment variable(s): NO_SUCH_VARIABLE",
    ]


def test_check_config_names_the_line_of_a_route_naming_an_unknown_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "backends: [http://127.0.0.1:1=a]\nrouting:\n  models:\n    'x.*': [a]\n    'y.*':\n      - a\n      - b\n"
    )
    assert main(["check-config", str(config_file)]) == 2
    assert "routing.models[1].backends (line 5): names unknown backend(s) b for 'y.*'" in capsys.readouterr().err
