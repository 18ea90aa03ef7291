"""A client's mistake is never the balancer's own 500: bad bodies are 400 ``invalid_json``, odd request
targets are forwarded in origin form or refused, and a bug is one OpenAI-style 500 with the request id."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.model_fleet import config_file
from tests.raw_http import exchange, parse_reply
from tests.support import make_config, run_balancer

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

BAD_BODIES = {
    "nested 5000 deep": b'{"model": "alias", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "an integer of 5000 digits": b'{"model": "alias", "max_tokens": ' + b"7" * 5000 + b"}",
    "NaN": b'{"model": "alias", "temperature": NaN, "messages": []}',
    "-Infinity": b'{"model": "alias", "temperature": -Infinity, "messages": []}',
    "a lone surrogate the balancer must re-encode": (
        b'{"model": "alias", "messages": [{"role": "user", "content": "\\ud800"}]}'
    ),
}


def _request_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "request"]


@pytest.mark.parametrize("name", BAD_BODIES)
async def test_a_body_the_json_reader_chokes_on_is_400_invalid_json_never_500(name: str, tmp_path: Path) -> None:
    async with run_fake_llama() as fake:
        # The backend serves "alias" as "alias-2": the body is re-encoded (where a lone surrogate cannot go).
        config = config_file(tmp_path, [{"url": fake.url, "models": ["alias-2"]}])
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs() as logs:
                async with session.post(
                    balancer.url + "/v1/chat/completions", data=BAD_BODIES[name],
                    headers={"Content-Type": "application/json"},
                ) as reply:
                    body = await reply.json()
                    assert reply.status == 400, body
                    assert body["error"]["code"] == "invalid_json"
            assert [e["status"] for e in _request_events(logs)] == [400]
            assert fake.stats["requests"].get("/v1/chat/completions", 0) == 0


async def test_a_gzip_body_is_read_and_forwarded_decoded_and_a_bad_one_is_400() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        packed = gzip.compress(json.dumps(CHAT).encode())
        async with session.post(balancer.url + "/v1/chat/completions", data=packed, headers=headers) as reply:
            assert reply.status == 200, await reply.text()
            assert (await reply.json())["choices"]
        async with session.post(balancer.url + "/v1/chat/completions", data=b"not gzip", headers=headers) as reply:
            assert reply.status == 400
            assert (await reply.json())["error"]["code"] == "invalid_body"


async def test_an_absolute_form_target_is_forwarded_as_its_path_and_query_only() -> None:
    async with run_fake_llama() as fake, run_balancer(make_config([fake.url])) as balancer:
        raw = await exchange(
            balancer.port, b"GET http://evil.example:1/slots?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        reply = parse_reply(raw)
        assert reply.status == 200, raw
        assert isinstance(reply.json(), list)  # the fake's /slots: the backend was the one configured
        assert fake.stats["requests"].get("/slots", 0) >= 1


@pytest.mark.parametrize("line", [b"OPTIONS * HTTP/1.1", b"CONNECT evil.example:443 HTTP/1.1"])
async def test_a_target_that_is_neither_a_path_nor_a_url_is_400(line: bytes) -> None:
    async with run_fake_llama() as fake, run_balancer(make_config([fake.url])) as balancer:
        reply = parse_reply(await exchange(balancer.port, line + b"\r\nHost: a\r\nConnection: close\r\n\r\n"))
        assert reply.status == 400
        assert reply.error_code() == "invalid_request_target"


async def test_a_bug_on_the_proxy_path_is_one_openai_500_with_the_request_id_and_its_traceback_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with run_fake_llama() as fake, run_balancer(make_config([fake.url])) as balancer:

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(balancer.components.dispatcher, "claim", broken)
        async with aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs() as logs:
                async with session.post(
                    balancer.url + "/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "bug-1"}
                ) as reply:
                    assert reply.status == 500
                    assert reply.headers["X-Request-ID"] == "bug-1"
                    assert (await reply.json())["error"]["code"] == "internal_error"
            errors = [e for e in logs if e["event"] == "unhandled_error"]
            assert len(errors) == 1 and errors[0]["request_id"] == "bug-1" and errors[0]["exc_info"]
            [access] = _request_events(logs)
            assert (access["status"], access["error"], access["request_id"]) == (500, "internal_error", "bug-1")
            # The daemon goes on serving.
            monkeypatch.undo()
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200


async def test_a_bug_in_an_own_route_is_one_openai_500_with_the_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_fake_llama() as fake, run_balancer(make_config([fake.url])) as balancer:

        def broken() -> bytes:
            raise RuntimeError("a bug")

        monkeypatch.setattr(balancer.components.metrics, "exposition", broken)
        async with aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs() as logs:
                async with session.get(balancer.url + "/metrics") as reply:
                    assert reply.status == 500
                    assert reply.content_type == "application/json"
                    rid = reply.headers["X-Request-ID"]
                    assert json.loads(await reply.read())["error"]["code"] == "internal_error"
            errors = [e for e in logs if e["event"] == "unhandled_error"]
            assert len(errors) == 1 and errors[0]["request_id"] == rid
            [access] = _request_events(logs)
            assert (access["status"], access["path"]) == (500, "/metrics")
