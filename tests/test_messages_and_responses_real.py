"""Anthropic's Messages API (``/v1/messages``) and OpenAI's Responses API (``/v1/responses``), which llama-server
speaks natively: passed through as they are, routed by the body's model, their tokens counted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmbalancer.fleet.usage import read_usage
from tests.support import LlamaServer, make_config, run_balancer, start_llama_server, wait_for, wait_ready


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LlamaServer, LlamaServer]]:
    tmp = Path(tmp_path_factory.mktemp("two-models"))
    first, second = start_llama_server(tmp), start_llama_server(tmp, alias="second")
    try:
        wait_ready(first.url)
        wait_ready(second.url)
        yield first, second
    finally:
        first.stop()
        second.stop()


def _event(text: str, kind: str) -> dict[str, Any]:
    """The first SSE event of type ``kind`` in ``text``."""
    events = (json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:"))
    return next(event for event in events if event.get("type") == kind)


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with session.post(url, json=body) as reply:
        return reply.status, await reply.text()


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_and_responses_are_routed_by_model_and_their_tokens_counted(
    two_models: tuple[LlamaServer, LlamaServer], stream: bool
) -> None:
    first, second = two_models
    config = make_config([f"{first.url}=first", f"{second.url}=second-server"], **{"policy.name": "round_robin"})
    hello = [{"role": "user", "content": "Say hello."}]
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        await wait_for(lambda: all(b.health.served_models for b in balancer.components.registry))
        for _ in range(2):  # round robin would alternate: the model decides
            status, text = await _post(session, balancer.url + "/v1/messages",
                                       {"model": "second", "max_tokens": 4, "messages": hello, "stream": stream,
                                        "temperature": 0})
            assert status == 200, text
        # Greedy: llama-server leaves out a stream's message_start when its first token is held back (an emoji's
        # bytes split over two tokens), which its default sampling picked about 1 time in 15 (docs/llama-server-api.md).
        asked = {"model": "second", "max_output_tokens": 4, "input": "Say hello.", "stream": stream, "temperature": 0}
        status, answer = await _post(session, balancer.url + "/v1/responses", asked)
        assert status == 200, answer
        await wait_for(lambda: len(balancer.components.snapshot()["requests"]) == 3)
        recent = balancer.components.snapshot()["requests"]
        assert {r["backend"] for r in recent} == {"second-server"}
        messages, responses = recent[1], recent[0]
        if stream:
            start = _event(text, "message_start")["message"]["usage"]
            usage = {**start, "output_tokens": _event(text, "message_delta")["usage"]["output_tokens"]}
            told = _event(answer, "response.completed")["response"]["usage"]
        else:
            usage, told = json.loads(text)["usage"], json.loads(answer)["usage"]
        # Anthropic's input_tokens leave out what came from the cache: the prompt is both.
        assert messages["prompt_tokens"] == usage["input_tokens"] + usage["cache_read_input_tokens"]
        assert messages["completion_tokens"] == usage["output_tokens"] == 4
        assert responses["prompt_tokens"] == told["input_tokens"] and responses["completion_tokens"] == 4
        status, text = await _post(session, balancer.url + "/v1/messages", {"model": "nowhere", "messages": hello})
        assert status == 404 and "second" in text


def test_usage_is_read_from_the_messages_and_responses_shapes() -> None:
    messages = b'{"usage":{"cache_read_input_tokens":31,"input_tokens":1,"output_tokens":5}}'
    assert read_usage(messages) is not None
    found = read_usage(messages)
    assert found is not None and (found.prompt_tokens, found.completion_tokens, found.cached_tokens) == (32, 5, 31)
    head = b'event: message_start\ndata: {"message":{"usage":{"input_tokens":7,"cache_creation_input_tokens":2,' \
        b'"output_tokens":0}}}\n\n'
    tail = b'event: message_delta\ndata: {"usage":{"output_tokens":3}}\n\nevent: message_stop\n\n'
    found = read_usage(tail, head)
    assert found is not None and (found.prompt_tokens, found.completion_tokens, found.cached_tokens) == (9, 3, None)
    responses = b'{"usage":{"input_tokens":32,"output_tokens":5,"input_tokens_details":{"cached_tokens":30}}}'
    found = read_usage(responses)
    assert found is not None and (found.prompt_tokens, found.completion_tokens, found.cached_tokens) == (32, 5, 30)
