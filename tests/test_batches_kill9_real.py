"""`kill -9` of the balancer in the middle of a batch, then `serve` again: the batch completes, every
custom_id exactly once in its output, with answers from two real llama-servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import yaml

from tests.batch_support import chat_line, jsonl, sync_wait_completed, sync_wait_status
from tests.support import REPO, LlamaServer, free_port, wait_ready


def _serve(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "llmbalancer", "serve", "--config", str(config_file)],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
        )


def test_a_batch_survives_kill_9_of_the_balancer_and_completes_each_line_once(
    llama_fleet: list[LlamaServer], tmp_path: Path
) -> None:
    port = free_port()
    config_file = tmp_path / "balancer.yaml"
    config_file.write_text(yaml.safe_dump({
        "server": {"port": port},
        "backends": [s.url for s in llama_fleet],
        "batch": {"dir": str(tmp_path / "data")},
        "logging": {"format": "json"},
        "health": {"interval": 0.2},
    }))
    url = f"http://127.0.0.1:{port}"
    lines = [chat_line(f"k-{i:02d}", f"Tell me about the number {i}.", max_tokens=32, ignore_eos=True)
             for i in range(40)]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, timeout=30.0)
    log = tmp_path / "balancer.log"
    first = _serve(config_file, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(url, timeout=30)
        uploaded = client.files.create(file=("k.jsonl", jsonl(lines)), purpose="batch")
        created = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        running = sync_wait_completed(client, created.id, 4, timeout=60)
        first.kill()  # SIGKILL: lines in flight die with it
        first.wait(timeout=10)
        assert running.request_counts is not None
        done_before = running.request_counts.completed
        assert done_before < 40, "the batch finished before the kill: make the lines longer"

        second = _serve(config_file, log)
        wait_ready(url, timeout=30)
        batch = sync_wait_status(client, created.id, timeout=120)
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (40, 0)
        assert batch.error_file_id is None and batch.output_file_id is not None
        results = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    finally:
        client.close()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
    custom_ids = [r["custom_id"] for r in results]
    assert sorted(custom_ids) == [line["custom_id"] for line in lines]  # each exactly once
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 32 for r in results)
