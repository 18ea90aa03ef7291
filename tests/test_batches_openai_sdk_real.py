"""OpenAI's Files and Batches API through the official SDK, answered by two real llama-servers."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.batch_support import chat_line, client_for, jsonl, output_lines, wait_completed, wait_status
from tests.support import LlamaServer, make_config, run_balancer


def _config(fleet: list[LlamaServer], tmp_path: Path, **overrides: object) -> object:
    return make_config([s.url for s in fleet], **{"batch.dir": str(tmp_path / "data"), **overrides})


async def test_a_batch_runs_to_completed_with_one_real_completion_per_custom_id(
    llama_fleet: list[LlamaServer], tmp_path: Path
) -> None:
    lines = [chat_line(f"q-{i}", f"What is {i} plus {i}?", max_tokens=12) for i in range(12)]
    async with run_balancer(_config(llama_fleet, tmp_path)) as balancer, client_for(balancer.url) as client:
        uploaded = await client.files.create(file=("questions.jsonl", jsonl(lines)), purpose="batch")
        assert (uploaded.purpose, uploaded.filename, uploaded.bytes) == ("batch", "questions.jsonl", len(jsonl(lines)))
        assert (await client.files.content(uploaded.id)).content == jsonl(lines)

        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"purpose": "test"},
        )
        assert created.status == "validating"
        assert created.metadata == {"purpose": "test"}
        batch = await wait_status(client, created.id, timeout=120)
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 12, 0)
        assert batch.error_file_id is None
        assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
        assert batch.usage is not None and batch.usage.output_tokens > 0

        results = await output_lines(client, batch.output_file_id)
        assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)
        for result in results:
            assert result["error"] is None
            assert result["id"].startswith("batch_req_")
            response = result["response"]
            assert response["status_code"] == 200
            completion = response["body"]
            assert completion["object"] == "chat.completion"
            assert completion["choices"][0]["message"]["content"]
            assert completion["timings"]["predicted_n"] > 0  # a real llama-server's answer

        served = {b.name: b.traffic.requests_total for b in balancer.components.registry}
        assert all(count >= 1 for count in served.values()), served  # the lines were spread over the fleet
        listed = await client.batches.list(limit=5)
        assert [b.id for b in listed.data] == [batch.id]
        outputs = [f for f in (await client.files.list()).data if f.purpose == "batch_output"]
        assert [f.id for f in outputs] == [batch.output_file_id]


async def test_a_completions_batch_answers_each_prompt(llama_fleet: list[LlamaServer], tmp_path: Path) -> None:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "smollm2", "prompt": f"The number {i} is", "max_tokens": 6}}
        for i in range(4)
    ]
    async with run_balancer(_config(llama_fleet, tmp_path)) as balancer, client_for(balancer.url) as client:
        uploaded = await client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )
        batch = await wait_status(client, created.id, timeout=60)
        assert batch.status == "completed", batch
        results = await output_lines(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in results) == ["c0", "c1", "c2", "c3"]
    assert all(r["response"]["body"]["choices"][0]["text"] for r in results)


async def test_an_invalid_input_file_fails_the_batch_with_its_errors_by_line(
    llama_fleet: list[LlamaServer], tmp_path: Path
) -> None:
    good = chat_line("a")
    text = b"".join([
        jsonl([good]),                                                    # 1 fine
        b"{not json\n",                                                   # 2
        jsonl([{**chat_line("b"), "url": "/v1/completions"}]),            # 3 url is not the endpoint
        jsonl([chat_line("a")]),                                          # 4 duplicate custom_id
        jsonl([chat_line("c", stream=True)]),                             # 5 stream
        jsonl([{**chat_line("d"), "method": "GET"}]),                     # 6
        jsonl([{"method": "POST", "url": "/v1/chat/completions", "body": {}}]),  # 7 no custom_id
    ])
    async with run_balancer(_config(llama_fleet, tmp_path)) as balancer, client_for(balancer.url) as client:
        uploaded = await client.files.create(file=("bad.jsonl", text), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = await wait_status(client, created.id, timeout=30)
        requests_sent = sum(b.traffic.requests_total for b in balancer.components.registry)
    assert batch.status == "failed"
    assert batch.failed_at is not None and batch.output_file_id is None
    assert batch.errors is not None and batch.errors.data is not None
    by_line = {e.line: (e.code, e.param) for e in batch.errors.data}
    assert by_line == {
        2: ("invalid_json_line", None),
        3: ("invalid_url", "url"),
        4: ("duplicate_custom_id", "custom_id"),
        5: ("invalid_request", "body.stream"),
        6: ("invalid_request", "method"),
        7: ("invalid_request", "custom_id"),
    }
    assert requests_sent == 0  # nothing of an invalid batch runs


async def test_wrong_arguments_are_refused_the_way_openai_refuses_them(
    llama_fleet: list[LlamaServer], tmp_path: Path
) -> None:
    async with run_balancer(_config(llama_fleet, tmp_path)) as balancer, client_for(balancer.url) as client:
        uploaded = await client.files.create(file=("ok.jsonl", jsonl([chat_line("x")])), purpose="batch")
        for arguments in (
            {"input_file_id": uploaded.id, "endpoint": "/v1/moderations", "completion_window": "24h"},
            {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "1h"},
            {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ):
            try:
                await client.batches.create(**arguments)  # type: ignore[arg-type]
            except openai.BadRequestError:
                continue
            raise AssertionError(f"accepted {arguments}")
        try:
            await client.batches.retrieve("batch_nope")
        except openai.NotFoundError:
            pass
        else:
            raise AssertionError("an unknown batch was found")
        assert (await client.batches.list()).data == []


async def test_a_cancelled_batch_lets_running_lines_finish_and_starts_no_more(
    llama_fleet: list[LlamaServer], tmp_path: Path
) -> None:
    lines = [chat_line(f"long-{i}", "Count slowly.", max_tokens=48, ignore_eos=True) for i in range(30)]
    async with run_balancer(_config(llama_fleet, tmp_path)) as balancer, client_for(balancer.url) as client:
        registry = balancer.components.registry
        uploaded = await client.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await wait_completed(client, created.id, 2, timeout=60)
        cancelling = await client.batches.cancel(created.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        batch = await wait_status(client, created.id, timeout=60)
        sent = sum(b.traffic.requests_total for b in registry)
        done = await output_lines(client, batch.output_file_id)
        not_run = await output_lines(client, batch.error_file_id)
        try:
            await client.batches.cancel(created.id)
        except openai.BadRequestError:
            pass
        else:
            raise AssertionError("a cancelled batch was cancelled again")
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts is not None
    assert 2 <= batch.request_counts.completed < 30
    assert batch.request_counts.completed + batch.request_counts.failed == 30
    # The lines running at the cancel finished (a whole answer each), and none started after it.
    assert sent == len(done) == batch.request_counts.completed
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 48 for r in done)
    assert {r["error"]["code"] for r in not_run} == {"batch_cancelled"}
    assert sorted(r["custom_id"] for r in done + not_run) == sorted(line["custom_id"] for line in lines)


async def test_a_batch_past_its_completion_window_expires_with_the_rest_in_the_error_file(
    llama_fleet: list[LlamaServer], tmp_path: Path
) -> None:
    lines = [chat_line(f"slow-{i}", "Count slowly.", max_tokens=48, ignore_eos=True) for i in range(60)]
    config = _config(llama_fleet, tmp_path, **{"batch.completion_windows": {"24h": 86400, "3s": 3}})
    async with run_balancer(config) as balancer, client_for(balancer.url) as client:
        uploaded = await client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions",
            completion_window="3s",  # type: ignore[arg-type]  # the SDK's type knows only "24h"
        )
        assert created.expires_at == created.created_at + 3
        batch = await wait_status(client, created.id, timeout=30)
        done = await output_lines(client, batch.output_file_id)
        expired = await output_lines(client, batch.error_file_id)
        held = sum(b.traffic.in_flight for b in balancer.components.registry)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.request_counts is not None
    assert 0 < batch.request_counts.completed == len(done) < 60
    assert len(expired) == batch.request_counts.failed == 60 - len(done)
    assert {r["error"]["code"] for r in expired} == {"batch_expired"}
    assert all(r["response"] is None for r in expired)
    assert sorted(r["custom_id"] for r in done + expired) == sorted(line["custom_id"] for line in lines)
    assert held == 0  # the lines running at the deadline were stopped and their slots given back
