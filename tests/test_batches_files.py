"""The Files API: uploads streamed to disk within batch.max_file_bytes, listed, fetched, deleted; the batch
list's pages; where the data lives, and a data directory that cannot be used stopping the start."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai

from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.batch_support import chat_line, client_for, jsonl, wait_status
from tests.support import REPO, free_port, get_json, make_config, run_balancer


async def test_files_are_listed_fetched_and_deleted(tmp_path: Path) -> None:
    async with run_balancer(make_config([], **{"batch.dir": str(tmp_path)})) as balancer, \
            client_for(balancer.url) as client:
        made = [await client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line(str(i))])), purpose="batch")
                for i in range(3)]
        listed = await client.files.list()
        assert [f.id for f in listed.data] == [f.id for f in reversed(made)]  # newest first
        page = await client.files.list(limit=2, order="asc")
        assert [f.id for f in page.data] == [made[0].id, made[1].id] and page.has_more
        rest = await client.files.list(limit=2, order="asc", after=made[1].id)
        assert [f.id for f in rest.data] == [made[2].id] and not rest.has_more
        assert (await client.files.list(purpose="batch_output")).data == []
        assert (await client.files.retrieve(made[1].id)).filename == "f1.jsonl"

        deleted = await client.files.delete(made[1].id)
        assert deleted.deleted and deleted.id == made[1].id
        for call in (client.files.retrieve, client.files.content, client.files.delete):
            try:
                await call(made[1].id)
            except openai.NotFoundError:
                continue
            raise AssertionError(f"{call.__name__} found a deleted file")
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == sorted([made[0].id, made[2].id])


async def test_an_upload_over_batch_max_file_bytes_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    config = make_config([], **{"batch.dir": str(tmp_path), "batch.max_file_bytes": 100_000})

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: refused once past the limit
        for _ in range(30):
            yield b"x" * 10_000

    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        for payload in (b"x" * 200_000, chunked()):
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", payload, filename="big.jsonl")
            async with session.post(balancer.url + "/v1/files", data=form) as reply:
                assert reply.status == 413
                assert (await reply.json())["error"]["code"] == "file_too_large"
        assert (await get_json(session, balancer.url + "/v1/files"))["data"] == []
    assert list((tmp_path / "files").iterdir()) == []


async def test_an_upload_larger_than_a_request_body_streams_to_disk_whatever_the_field_order(tmp_path: Path) -> None:
    config = make_config([], **{"batch.dir": str(tmp_path), "server.max_body_bytes": 65536})
    text = jsonl([chat_line(f"id-{i}", "word " * 200) for i in range(1500)])
    assert len(text) > 1_500_000
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(text), filename="big.jsonl")  # purpose after the file
        form.add_field("purpose", "batch")
        async with session.post(balancer.url + "/v1/files", data=form) as reply:
            assert reply.status == 200, await reply.text()
            uploaded = await reply.json()
        async with session.get(f"{balancer.url}/v1/files/{uploaded['id']}/content") as reply:
            assert await reply.read() == text
        form = aiohttp.FormData()
        form.add_field("purpose", "fine-tune")
        form.add_field("file", b"{}\n", filename="x.jsonl")
        async with session.post(balancer.url + "/v1/files", data=form) as reply:
            assert reply.status == 400
            assert (await reply.json())["error"]["code"] == "invalid_purpose"
    assert uploaded["bytes"] == len(text) and uploaded["filename"] == "big.jsonl"
    assert [p.name for p in (tmp_path / "files").iterdir()] == [uploaded["id"]]


async def test_batches_are_listed_newest_first_by_pages(tmp_path: Path) -> None:
    async with (
        run_fake_fleet(1) as fakes,
        run_balancer(make_config([fakes[0].url], **{"batch.dir": str(tmp_path)})) as balancer,
        client_for(balancer.url) as client,
    ):
        uploaded = await client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
        made = []
        for _ in range(3):
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            made.append((await wait_status(client, batch.id)).id)
        first = await client.batches.list(limit=2)
        rest = await client.batches.list(limit=2, after=first.data[-1].id)
        try:
            await client.batches.list(limit=101)
        except openai.BadRequestError:
            pass
        else:
            raise AssertionError("limit 101 was accepted")
    assert [b.id for b in first.data] == [made[2], made[1]] and first.has_more
    assert [b.id for b in rest.data] == [made[0]] and not rest.has_more


async def test_a_balancer_nobody_sends_a_batch_leaves_nothing_on_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with run_balancer(make_config([], **{"batch.dir": str(data)})) as balancer, \
            client_for(balancer.url) as client:
        assert (await client.batches.list()).data == []
        assert (await client.files.list()).data == []
    assert not data.exists()


def _serve_with(batch_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmbalancer", "serve", "--port", str(free_port()), "--backend", "http://127.0.0.1:9"],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "LLMBALANCER_BATCH__DIR": str(batch_dir)},
        capture_output=True, text=True, timeout=60,
    )


def test_a_corrupt_database_or_a_dir_that_is_a_file_is_a_clear_start_up_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "batches.sqlite3").write_bytes(b"this is not a database, it is a text file " * 100)
    corrupt = _serve_with(data)
    assert corrupt.returncode == 2, corrupt.stdout + corrupt.stderr
    assert "batch.dir" in corrupt.stderr and "not a usable SQLite database" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr

    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    refused = _serve_with(a_file)
    assert refused.returncode == 2
    assert "batch.dir" in refused.stderr and "is not a directory" in refused.stderr
