"""A backend killed in the middle of a batch: the lines it was running are sent again to the others and
the batch completes, none lost and none twice (fake llama-servers as processes, one killed with SIGKILL)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.batch_support import chat_line, client_for, jsonl, output_lines, wait_completed, wait_status
from tests.support import REPO, LlamaServer, free_port, make_config, run_balancer, wait_for, wait_ready


@contextlib.contextmanager
def slow_fakes(tmp_path: Path, count: int, slots: int, token_delay: float) -> Iterator[list[LlamaServer]]:
    servers: list[LlamaServer] = []
    try:
        for _ in range(count):
            port = free_port()
            log_path = tmp_path / f"fake-{port}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "llmbalancer.testing.fake_llama", "--port", str(port), "--slots",
                     str(slots), "--token-delay", str(token_delay)],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                )
            servers.append(LlamaServer(port, process, log_path))
        for server in servers:
            wait_ready(server.url, timeout=20)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def test_the_lines_of_a_backend_killed_mid_batch_are_redone_elsewhere_none_lost(tmp_path: Path) -> None:
    lines = [chat_line(f"line-{i:03d}", max_tokens=20) for i in range(60)]
    with slow_fakes(tmp_path, 3, slots=4, token_delay=0.02) as fakes:
        config = make_config([f"{f.url}=f{i}" for i, f in enumerate(fakes)], **{"batch.dir": str(tmp_path / "d")})
        async with run_balancer(config) as balancer, client_for(balancer.url) as client:
            runner = balancer.components.batches
            assert runner is not None
            uploaded = await client.files.create(file=("l.jsonl", jsonl(lines)), purpose="batch")
            created = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            await wait_completed(client, created.id, 10, timeout=30)
            # Killed while it runs lines (between two of its lines it may hold none for a moment: wait for one).
            await wait_for(lambda: runner.gate.held["f2"] > 0, timeout=10, interval=0.005)
            fakes[2].kill()
            batch = await wait_status(client, created.id, timeout=60)
            results = await output_lines(client, batch.output_file_id)
            retried = runner.outcomes["retried"]
            victim = balancer.components.registry.get("f2")
            assert victim is not None
            victim_state = victim.state.value
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (60, 0)
    assert batch.error_file_id is None
    assert sorted(r["custom_id"] for r in results) == [line["custom_id"] for line in lines]
    assert retried >= 1
    assert victim_state == "unhealthy"
