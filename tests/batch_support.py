"""Helpers for the batch tests: input files, and waiting for a batch to reach a status (bounded)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
from openai.types import Batch

FINISHED = ("completed", "failed", "expired", "cancelled")


def chat_line(custom_id: str, content: str = "Say hi.", max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                 **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def client_for(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30.0)


async def wait_status(
    client: openai.AsyncOpenAI, batch_id: str, statuses: tuple[str, ...] = FINISHED, timeout: float = 60.0  # noqa: ASYNC109 - a bounded test poll
) -> Batch:
    """Poll the batch until its status is one of ``statuses`` (bounded by ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout} s: {batch.request_counts}")
        await asyncio.sleep(0.1)


async def wait_completed(
    client: openai.AsyncOpenAI, batch_id: str, at_least: int, timeout: float = 60.0  # noqa: ASYNC109 - bounded poll
) -> Batch:
    """Poll until at least ``at_least`` lines of the batch completed (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.request_counts is not None and batch.request_counts.completed >= at_least:
            return batch
        if batch.status in FINISHED or time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} is {batch.status} with {batch.request_counts}")
        await asyncio.sleep(0.05)


async def output_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


def sync_wait_status(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = FINISHED,
                     timeout: float = 60.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout} s: {batch.request_counts}")
        time.sleep(0.1)


def sync_wait_completed(client: openai.OpenAI, batch_id: str, at_least: int, timeout: float = 60.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.request_counts is not None and batch.request_counts.completed >= at_least:
            return batch
        if batch.status in FINISHED or time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} is {batch.status} with {batch.request_counts}")
        time.sleep(0.05)
