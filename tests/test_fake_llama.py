"""The fake llama-server speaks the probed llama-server API and injects its faults on cue."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from llmbalancer.testing.fake_llama import (
    FakeLlama,
    FakeLlamaConfig,
    run_fake_fleet,
    run_fake_llama,
    tokenize,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def sse_events(raw: bytes) -> list[str]:
    assert raw.endswith(b"\n\n")
    return [e.decode() for e in raw.split(b"\n\n") if e]


def data_json(event: str) -> dict[str, Any]:
    assert event.startswith("data: ")
    return json.loads(event[len("data: ") :])  # type: ignore[no-any-return]


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json(content_type=None)


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4"
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def wait_for(predicate: Any, within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_loading_then_ready_health_and_unknown_path(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama(FakeLlamaConfig(load_time=0.3)) as fake:
        loading = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
        for path in ("/health", "/slots", "/v1/models", "/nope"):
            async with session.get(fake.url + path) as r:
                assert r.status == 503
                assert r.headers["Server"] == "llama.cpp"
                assert await r.json() == loading
        async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
            assert r.status == 503
        # control endpoints are never "loading"
        assert (await get_json(session, fake.url + "/_fake/stats"))[0] == 200

        async def ready() -> bool:
            return (await get_json(session, fake.url + "/health"))[0] == 200

        await wait_for(ready, within=2.0)
        async with session.get(fake.url + "/health") as r:
            assert await r.json() == {"status": "ok"}
            assert r.headers["Keep-Alive"] == "timeout=5, max=100"
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        status, body = await get_json(session, fake.url + "/nope")
        assert status == 404
        assert body == {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
        status, props = await get_json(session, fake.url + "/props")
        assert status == 200 and props["total_slots"] == 2 and props["model_alias"] == "smollm2"
        status, models = await get_json(session, fake.url + "/v1/models")
        assert models["models"][0]["name"] == "smollm2"
        assert models["object"] == "list" and models["data"][0]["id"] == "smollm2"
        assert models["data"][0]["owned_by"] == "llamacpp"


async def test_request_errors_match_the_real_server(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        async with session.post(fake.url + CHAT, data=b"{not json") as r:
            body = await r.json()
            assert r.status == 500 and body["error"]["type"] == "server_error"
            assert body["error"]["message"].startswith("[json.exception.parse_error.101]")
        async with session.post(fake.url + CHAT, json={"model": "x"}) as r:
            assert r.status == 400
            assert await r.json() == {
                "error": {"code": 400, "message": "'messages' is required", "type": "invalid_request_error"}
            }
        long = [{"role": "user", "content": "word " * 3000}]
        async with session.post(fake.url + CHAT, json={"messages": long, "stream": True}) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["type"] == "exceed_context_size_error"
            assert body["error"]["n_ctx"] == 2048


async def test_slots_shape_cache_and_non_streaming_reply(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        status, slots = await get_json(session, fake.url + "/slots")
        assert status == 200
        assert slots == [
            {"id": 0, "n_ctx": 2048, "speculative": False, "is_processing": False},
            {"id": 1, "n_ctx": 2048, "speculative": False, "is_processing": False},
        ]
        req = {"model": "whatever", "messages": MESSAGES, "max_tokens": 4}
        first: dict[str, Any] = {}
        for i in range(2):
            async with session.post(fake.url + CHAT, json=req) as r:
                assert r.status == 200
                reply = await r.json()
            if i == 0:
                first = reply
        assert first["model"] == "smollm2" and first["object"] == "chat.completion"
        assert first["id"].startswith("chatcmpl-") and len(first["id"]) == len("chatcmpl-") + 32
        choice = first["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["message"] == {"role": "assistant", "content": "Hello from the fake"}
        n_prompt = first["usage"]["prompt_tokens"]
        assert first["usage"]["completion_tokens"] == 4 and first["timings"]["cache_n"] == 0
        # the repeated prompt is served from the slot's cache, one token always evaluated
        assert reply["timings"]["cache_n"] == n_prompt - 1 and reply["timings"]["prompt_n"] == 1
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
        status, slots = await get_json(session, fake.url + "/slots")
        used = [s for s in slots if "id_task" in s]
        assert len(used) == 1 and used[0]["id"] == 1  # LRU ties go to the highest id
        assert used[0]["is_processing"] is False
        assert used[0]["n_prompt_tokens"] == n_prompt + 4 - 1
        assert used[0]["next_token"][0]["has_next_token"] is False
        # no max_tokens: the whole reply, then "stop"
        async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
            full = await r.json()
        assert full["choices"][0]["finish_reason"] == "stop"
        assert full["choices"][0]["message"]["content"] == "Hello from the fake llama server."
    assert tokenize("<|im_start|>user\nHi there<|im_end|>") == ["<|im_start|>", "user", "Hi", "there", "<|im_end|>"]


async def test_a_follow_up_turn_reuses_a_repeated_reply(session: aiohttp.ClientSession) -> None:
    """With ignore_eos the reply repeats; sent back as history, every generated token but the last is reused,
    as on the real server (the repetitions are separated by a space, so the text re-tokenizes the same)."""
    async with run_fake_llama() as fake:
        req: dict[str, Any] = {"messages": list(MESSAGES), "max_tokens": 15, "ignore_eos": True}
        async with session.post(fake.url + CHAT, json=req) as r:
            first = await r.json()
        content = first["choices"][0]["message"]["content"]
        assert "server. Hello" in content and len(tokenize(content)) == 15
        follow_up = req["messages"] + [
            {"role": "assistant", "content": content}, {"role": "user", "content": "And again?"}
        ]
        async with session.post(fake.url + CHAT, json={**req, "messages": follow_up}) as r:
            second = await r.json()
        assert second["timings"]["cache_n"] == first["usage"]["prompt_tokens"] + 15 - 1


@pytest.mark.parametrize("cache_idle_slots", [True, False])
async def test_idle_slots_are_saved_to_the_ram_cache_at_each_task(
    session: aiohttp.ClientSession, cache_idle_slots: bool
) -> None:
    """As llama.cpp's --cache-idle-slots: chat X's slot, idle while another task starts, is saved to RAM; a later
    chat with the same system prompt overwrites the slot (keeping >= 50 %, so no save then); X's follow-up
    lands on that slot keeping < 50 % of it and gets X back from RAM. Without idle saving X is gone."""
    system = {"role": "system", "content": " ".join(f"s{i}" for i in range(50))}
    chat_x = [system, {"role": "user", "content": "x " * 10}]
    chat_y = [system, {"role": "user", "content": "y " * 200}]
    other = [{"role": "system", "content": "z " * 40}, {"role": "user", "content": "z"}]

    async def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
        async with session.post(fake.url + CHAT, json={"messages": messages, "max_tokens": 4}) as r:
            reply: dict[str, Any] = await r.json()
            return reply

    async with run_fake_llama(FakeLlamaConfig(cache_idle_slots=cache_idle_slots)) as fake:
        first = await ask(chat_x)  # slot 1 (LRU ties to the highest id)
        await ask(other)  # by LRU to slot 0; X's slot is idle as it starts
        await ask(chat_y)  # by similarity to X's slot, keeping its system prompt: no save
        x_reply = first["choices"][0]["message"]["content"]
        follow_up = await ask([*chat_x, {"role": "assistant", "content": x_reply}, {"role": "user", "content": "?"}])
    x_cached = first["usage"]["prompt_tokens"] + 4 - 1
    if cache_idle_slots:
        assert follow_up["timings"]["cache_n"] == x_cached
    else:
        assert follow_up["timings"]["cache_n"] < first["usage"]["prompt_tokens"] - 5  # only the system prompt


async def test_sse_stream_format_and_done(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        req = {"messages": MESSAGES, "stream": True, "max_tokens": 3}
        async with session.post(fake.url + CHAT, json=req) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            assert r.headers["X-Accel-Buffering"] == "no"
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert r.headers["Server"] == "llama.cpp"
            events = sse_events(await r.read())
        assert events[-1] == "data: [DONE]"
        chunks = [data_json(e) for e in events[:-1]]
        assert len(chunks) == 1 + 3 + 1
        assert chunks[0]["choices"] == [
            {"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}
        ]
        assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["Hello", " from", " the"]
        for c in chunks:
            assert c["object"] == "chat.completion.chunk" and c["model"] == "smollm2"
            assert c["id"] == chunks[0]["id"] and c["system_fingerprint"] == "b1-0c1e570"
        finish = chunks[-1]
        assert finish["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
        assert finish["timings"]["predicted_n"] == 3 and "usage" not in finish

        native = {"prompt": "The capital of France is", "n_predict": 2, "stream": True}
        async with session.post(fake.url + "/completion", json=native) as r:
            events = sse_events(await r.read())
        assert "data: [DONE]" not in events
        parts = [data_json(e) for e in events]
        assert [p["stop"] for p in parts] == [False, False, True]
        assert parts[0]["content"] == "Hello" and parts[0]["tokens_predicted"] == 1
        assert parts[-1]["stop_type"] == "limit" and "timings" in parts[-1]


async def test_include_usage_adds_a_usage_chunk(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        req = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(fake.url + CHAT, json=req) as r:
            events = sse_events(await r.read())
        assert events[-1] == "data: [DONE]"
        finish, usage = data_json(events[-3]), data_json(events[-2])
        assert finish["choices"][0]["finish_reason"] == "stop" and "timings" not in finish
        assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
        assert usage["usage"]["completion_tokens"] == 6
        assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 6
        assert usage["timings"]["predicted_n"] == 6


async def test_requests_beyond_the_slots_wait_in_a_fifo(session: aiohttp.ClientSession) -> None:
    config = FakeLlamaConfig(slots=2, token_delay=0.05)
    async with run_fake_llama(config) as fake:
        starts: list[tuple[int, float]] = []

        async def one(i: int) -> str:
            req = {"messages": [{"role": "user", "content": f"request {i}"}], "stream": True, "max_tokens": 5}
            async with session.post(fake.url + CHAT, json=req) as r:
                starts.append((i, time.monotonic()))  # headers arrive with the first token
                return (await r.read()).decode()

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.01)  # a known arrival order

        async def two_deferred() -> bool:
            return await metric(session, fake.url, "requests_deferred") == 2

        await wait_for(two_deferred)
        assert await metric(session, fake.url, "requests_processing") == 2
        assert (await get_json(session, fake.url + "/health"))[0] == 200
        status, body = await get_json(session, fake.url + "/slots?fail_on_no_slot=1")
        assert status == 503
        assert body == {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}
        assert all(t.endswith("data: [DONE]\n\n") for t in await asyncio.gather(*tasks))
        assert [i for i, _ in starts][2:] == [2, 3]
        assert starts[2][1] - starts[0][1] > 0.15  # the deferred ones waited for a slot
        assert await metric(session, fake.url, "requests_deferred") == 0
        assert fake.stats["max_processing"] == 2 and fake.stats["max_deferred"] == 2


async def test_crash_mid_stream_truncates_the_response(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        fake.set_fault("crash_mid_stream", after_tokens=2)
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(fake.url + CHAT, json={"messages": MESSAGES, "stream": True}) as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    got += chunk
        events = sse_events(got)
        assert len(events) == 3 and b"[DONE]" not in got  # role chunk + 2 tokens
        assert fake.stats["faults_applied"] == 1 and fake.stats["processing"] == 0
        # a non-streaming request dies before any byte
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
                await r.read()
        # health checks are not faulted by default
        assert (await get_json(session, fake.url + "/health"))[0] == 200


async def test_error_500_close_immediately_and_count(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        async with session.post(fake.url + "/_fake/fault", json={"mode": "error_500", "count": 1}) as r:
            assert r.status == 200 and (await r.json())["fault"]["mode"] == "error_500"
        async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
            assert r.status == 500
            assert (await r.json())["error"]["type"] == "server_error"
        async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
            assert r.status == 200  # count exhausted
        fake.set_fault("close_immediately")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
                await r.read()
        async with session.post(fake.url + "/_fake/fault", json={"mode": "bogus"}) as r:
            assert r.status == 400
        async with session.delete(fake.url + "/_fake/fault") as r:
            assert (await r.json())["fault"]["mode"] == "none"
        async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
            assert r.status == 200


async def test_hang_until_the_fault_is_cleared(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        fake.set_fault("hang")

        async def call() -> int:
            async with session.post(fake.url + CHAT, json={"messages": MESSAGES}) as r:
                await r.read()
                return r.status

        task = asyncio.create_task(call())
        await asyncio.sleep(0.2)
        assert not task.done()
        fake.clear_fault()
        assert await asyncio.wait_for(task, 2.0) == 200
        # mid-stream hang: the stream stalls after 1 token while holding its slot
        fake.set_fault("hang", after_tokens=1)
        req = {"messages": MESSAGES, "stream": True}
        async with session.post(fake.url + CHAT, json=req) as r:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 2.0)
            assert b'"role":"assistant"' in first
            await asyncio.sleep(0.1)
            assert fake.stats["processing"] == 1
            fake.clear_fault()
            rest = await asyncio.wait_for(r.read(), 2.0)
        assert rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_frees_the_slot(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama(FakeLlamaConfig(slots=1, token_delay=0.1)) as fake:
        req = {"messages": MESSAGES, "stream": True, "max_tokens": 100, "ignore_eos": True}
        async with session.post(fake.url + CHAT, json=req) as r:
            await r.content.readuntil(b"\n\n")
            _, slots = await get_json(session, fake.url + "/slots")
            assert slots[0]["is_processing"] is True
            r.close()  # drop the connection mid-stream

        async def freed() -> bool:
            _, slots = await get_json(session, fake.url + "/slots")
            return slots[0]["is_processing"] is False

        await wait_for(freed, within=1.0)
        assert fake.stats["cancelled"] == 1 and fake.stats["completed"] == 0
        assert await metric(session, fake.url, "requests_processing") == 0


async def test_stats_show_what_arrived(session: aiohttp.ClientSession) -> None:
    async with run_fake_llama() as fake:
        headers = {"X-Forwarded-For": "10.1.2.3"}
        body = {"model": "rewritten", "messages": MESSAGES}
        async with session.post(fake.url + CHAT, json=body, headers=headers) as r:
            assert r.status == 200
        await get_json(session, fake.url + "/health")
        status, stats = await get_json(session, fake.url + "/_fake/stats")
        assert status == 200
        assert stats["requests"] == {CHAT: 1, "/health": 1}
        last_chat = stats["last_by_path"][CHAT]
        assert last_chat["headers"]["x-forwarded-for"] == "10.1.2.3"
        assert last_chat["body"]["model"] == "rewritten"
        assert stats["last_request"]["path"] == "/health"
        async with session.delete(fake.url + "/_fake/stats") as r:
            assert (await r.json())["requests_total"] == 0


async def test_stop_and_restart_on_the_same_port(session: aiohttp.ClientSession) -> None:
    fake = FakeLlama(FakeLlamaConfig(token_delay=0.05))
    async with fake:
        port = fake.port
        req = {"messages": MESSAGES, "stream": True, "max_tokens": 50, "ignore_eos": True}
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(fake.url + CHAT, json=req) as r:
                await r.content.readuntil(b"\n\n")
                await fake.stop()  # the backend dies mid-stream
                await r.read()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(fake.url + "/health") as r:
                pass
        await fake.start()
        assert fake.port == port
        assert (await get_json(session, fake.url + "/health"))[0] == 200
        assert fake.stats["processing"] == 0


async def test_fleet_and_keepalive_max(session: aiohttp.ClientSession) -> None:
    configs = [FakeLlamaConfig(alias="a", keepalive_max=2), FakeLlamaConfig(alias="b")]
    async with run_fake_fleet(2, configs) as fleet:
        assert len({f.port for f in fleet}) == 2
        _, props = await get_json(session, fleet[1].url + "/props")
        assert props["model_alias"] == "b"
        async with session.get(fleet[0].url + "/health") as r:
            assert "Connection" not in r.headers
        async with session.get(fleet[0].url + "/health") as r:
            assert r.headers["Connection"] == "close"  # the connection's 2nd request is its last


async def test_cli_serves_and_exits_on_sigterm(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmbalancer.testing.fake_llama",
        "--port",
        "0",
        "--slots",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10.0)
        assert line.startswith(b"fake llama-server listening on http://127.0.0.1:")
        url = line.decode().split()[-1]
        status, props = await get_json(session, url + "/props")
        assert status == 200 and props["total_slots"] == 3
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
