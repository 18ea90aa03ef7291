"""``llmbalancer status`` reads a running balancer's snapshot and prints one row per backend."""

from __future__ import annotations

import asyncio
import json

import pytest

from llmbalancer.cli import main
from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.support import free_port, make_config, run_balancer


async def test_status_prints_a_row_per_backend(capsys: pytest.CaptureFixture[str]) -> None:
    async with (
        run_fake_fleet(2) as fakes,
        run_balancer(make_config([f"{fakes[0].url}=alpha", f"{fakes[1].url}=beta"])) as balancer,
    ):
        code = await asyncio.to_thread(main, ["status", "--url", balancer.url])
        out = capsys.readouterr().out
        assert code == 0
        lines = out.splitlines()
        start = next(i for i, line in enumerate(lines) if "backends up" in line)  # the app's logs share stdout
        header, columns, *rows = lines[start : start + 4]
        assert header.startswith("2/2 backends up")
        assert columns.split()[:2] == ["BACKEND", "STATE"]
        assert sorted(row.split()[:2][0] for row in rows) == ["alpha", "beta"]
        assert all(row.split()[1] == "healthy" for row in rows)

        code = await asyncio.to_thread(main, ["status", "--url", balancer.url, "--json"])
        assert code == 0
        out = capsys.readouterr().out
        document = json.loads(out[out.index("{\n") :])
        assert {b["name"] for b in document["backends"]} == {"alpha", "beta"}


def test_status_says_when_no_balancer_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot read" in capsys.readouterr().err
