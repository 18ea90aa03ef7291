"""An /v1/embeddings batch through the openai SDK, answered by a real llama-server serving embeddings."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.batch_support import client_for, jsonl, output_lines, wait_status
from tests.support import LlamaServer, free_port, llama_server_command, make_config, run_balancer, wait_ready


@contextlib.contextmanager
def embedding_server(tmp_path: Path) -> Iterator[LlamaServer]:
    port = free_port()
    log_path = tmp_path / "llama-embeddings.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*llama_server_command(port, slots=2), "--embeddings", "--pooling", "mean"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = LlamaServer(port, process, log_path)
    try:
        wait_ready(server.url)
        yield server
    finally:
        server.stop()


async def test_an_embeddings_batch_gets_one_vector_per_input(tmp_path: Path) -> None:
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "smollm2", "input": f"sentence number {i}"}}
        for i in range(6)
    ]
    with embedding_server(tmp_path) as server:
        config = make_config([server.url], **{"batch.dir": str(tmp_path / "data")})
        async with run_balancer(config) as balancer, client_for(balancer.url) as client:
            uploaded = await client.files.create(file=("e.jsonl", jsonl(lines)), purpose="batch")
            created = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
            )
            batch = await wait_status(client, created.id, timeout=60)
            results = await output_lines(client, batch.output_file_id)
    assert batch.status == "completed", batch
    assert sorted(r["custom_id"] for r in results) == [f"e{i}" for i in range(6)]
    vectors = [r["response"]["body"]["data"][0]["embedding"] for r in results]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100
    assert batch.usage is not None and batch.usage.input_tokens > 0
