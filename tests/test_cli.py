"""The command line: check-config prints the effective configuration or every problem."""

from __future__ import annotations

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
                                   "body_timeout": 60.0}
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
