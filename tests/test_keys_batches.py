"""Files and batches with client keys: each key sees only what it made, and a batch's lines count against
its key's limits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.batch_support import chat_line, jsonl, wait_completed
from tests.keys_support import CHAT, TEAM_A, TEAM_B, client, keyed_config
from tests.support import run_balancer


async def _minute_with_room(seconds: float) -> None:
    """Start a test that counts within one minute with at least ``seconds`` of it left (bounded wait)."""
    left = 60 - time.time() % 60
    if left < seconds:
        await asyncio.sleep(left + 0.1)


async def test_a_key_sees_only_its_own_files_and_batches_and_needs_a_key(tmp_path: Path) -> None:
    async with run_fake_llama() as fake:
        config = keyed_config(
            [fake.url], {"name": "team-a", "key": TEAM_A}, {"name": "team-b", "key": TEAM_B},
            **{"batch.dir": str(tmp_path)},
        )
        async with run_balancer(config) as balancer, client(balancer.url, TEAM_A) as a, \
                client(balancer.url, TEAM_B) as b, client(balancer.url, "sk-nobody-000000") as nobody:
            made = await a.files.create(file=("a.jsonl", jsonl([chat_line("1")])), purpose="batch")
            assert [f.id for f in (await a.files.list()).data] == [made.id]
            assert (await b.files.list()).data == []
            for call in (b.files.retrieve, b.files.content, b.files.delete):
                with pytest.raises(openai.NotFoundError):
                    await call(made.id)
            with pytest.raises(openai.BadRequestError):
                await b.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
            batch = await a.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
            assert [x.id for x in (await a.batches.list()).data] == [batch.id]
            assert (await b.batches.list()).data == []
            for call in (b.batches.retrieve, b.batches.cancel):
                with pytest.raises(openai.NotFoundError):
                    await call(batch.id)
            with pytest.raises(openai.AuthenticationError):
                await nobody.files.list()


async def test_a_batchs_lines_count_against_its_keys_rpm(tmp_path: Path) -> None:
    async with run_fake_llama() as fake:
        config = keyed_config(
            [fake.url], {"name": "team-a", "key": TEAM_A, "rpm": 3}, {"name": "team-b", "key": TEAM_B},
            **{"batch.dir": str(tmp_path)},
        )
        async with run_balancer(config) as balancer, client(balancer.url, TEAM_A) as a, \
                client(balancer.url, TEAM_B) as b:
            await _minute_with_room(20)
            made = await a.files.create(file=("a.jsonl", jsonl([chat_line(str(i)) for i in range(6)])), purpose="batch")
            batch = await a.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
            await wait_completed(a, batch.id, 3)
            await asyncio.sleep(1.0)  # the runner had every chance to start more
            again = await a.batches.retrieve(batch.id)
            assert again.status == "in_progress"
            assert again.request_counts is not None and again.request_counts.completed == 3
            assert fake.stats["requests"]["/v1/chat/completions"] == 3
            with pytest.raises(openai.RateLimitError):  # its lines used the key's minute
                await a.chat.completions.create(**CHAT)
            assert (await b.chat.completions.create(**CHAT)).choices  # another key's requests go on
