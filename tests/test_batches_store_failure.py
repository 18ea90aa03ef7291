"""A line whose result could not be committed (the store failed once) is not lost: it stays pending and is
run again before the batch ends, so the output still holds every custom_id once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.batch_support import chat_line, client_for, jsonl, output_lines, wait_status
from tests.support import make_config, run_balancer


async def test_a_result_the_store_failed_to_commit_is_run_again(tmp_path: Path) -> None:
    async with (
        run_fake_fleet(2) as fakes,
        run_balancer(make_config([f.url for f in fakes], **{"batch.dir": str(tmp_path)})) as balancer,
        client_for(balancer.url) as client,
    ):
        runner = balancer.components.batches
        assert runner is not None
        record_line = runner.store.record_line
        failures = []

        async def failing_once(*args: Any) -> bool:
            if not failures:
                failures.append(args)
                raise OSError("disk full, once")
            return await record_line(*args)

        runner.store.record_line = failing_once  # type: ignore[method-assign]
        lines = [chat_line(f"r{i}") for i in range(10)]
        uploaded = await client.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = await wait_status(client, created.id, timeout=30)
        results = await output_lines(client, batch.output_file_id)
    assert len(failures) == 1
    assert batch.status == "completed"
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)
