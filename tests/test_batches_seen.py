"""A running batch is seen: `llmbalancer status` lists it, /metrics counts its lines by outcome and the slots
its lines hold, and the snapshot's batch fields are documented in the README."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from llmbalancer.cli import main
from llmbalancer.observe.snapshot import BATCH_FIELDS, BATCHES_FIELDS
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.batch_support import chat_line, client_for, jsonl, wait_completed, wait_status
from tests.support import REPO, make_config, run_balancer


def test_every_snapshot_batch_field_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## Monitoring\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match
    documented = set(re.findall(r"`([a-z_][a-z0-9_.]*)`", match.group(1)))
    for name in ("batches", *BATCHES_FIELDS, *BATCH_FIELDS):
        assert name in documented, f"snapshot field {name!r} is not documented in README.md's Monitoring section"


async def test_status_and_metrics_show_a_running_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [chat_line(f"s{i}", max_tokens=10, ignore_eos=True) for i in range(60)]
    async with (
        run_fake_fleet(2, FakeLlamaConfig(slots=3, token_delay=0.03)) as fakes,
        run_balancer(make_config([f"{f.url}=f{i}" for i, f in enumerate(fakes)],
                                 **{"batch.dir": str(tmp_path)})) as balancer,
        client_for(balancer.url) as client,
        aiohttp.ClientSession() as session,
    ):
        uploaded = await client.files.create(file=("s.jsonl", jsonl(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await wait_completed(client, created.id, 6)
        code = await asyncio.to_thread(main, ["status", "--url", balancer.url])
        out = capsys.readouterr().out
        async with session.get(balancer.url + "/metrics") as reply:
            running = await reply.text()
        snapshot = balancer.components.snapshot()["batches"]
        await wait_status(client, created.id, timeout=60)
        async with session.get(balancer.url + "/metrics") as reply:
            ended = await reply.text()
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("BATCH"))
    assert header.split()[:3] == ["BATCH", "STATUS", "DONE"]
    row = next(line for line in out.splitlines() if line.startswith(created.id))
    assert row.split()[1] == "in_progress" and row.split()[4] == "60"
    assert "batch work holds" in out

    assert tuple(snapshot) == BATCHES_FIELDS and tuple(snapshot["active"][0]) == BATCH_FIELDS
    assert snapshot["slots_held"] == sum(snapshot["slots_held_by_backend"].values()) > 0
    assert re.search(r'^llmbalancer_batch_slots_held [1-9]', running, re.M)
    assert re.search(r'^llmbalancer_backend_batch_in_flight\{backend="f0"\} [1-9]', running, re.M)
    assert re.search(r'^llmbalancer_batches\{status="in_progress"\} 1\.0', running, re.M)
    assert re.search(r'^llmbalancer_batch_lines_total\{outcome="completed"\} 60\.0', ended, re.M)
    assert re.search(r'^llmbalancer_batch_slots_held 0\.0', ended, re.M)
