"""The balancer's own paths (/health, /metrics, /llmhealth*, /admin/*) are its own for every method: one it
does not answer is 405 with ``Allow``, an unknown path under /admin or /llmhealth is 404, OpenAI-style JSON
either way; none of them ever reaches a backend."""

from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.support import make_config, run_balancer

CASES = [
    ("PUT", "/admin/instances/x/stop", 405, "POST"),
    ("GET", "/admin/instances/x/stop", 405, "POST"),
    ("GET", "/admin/x", 404, None),
    ("GET", "/admin", 404, None),
    ("DELETE", "/admin/instances", 405, "GET,HEAD"),
    ("POST", "/health", 405, "GET,HEAD"),
    ("DELETE", "/metrics", 405, "GET,HEAD"),
    ("POST", "/llmhealth-snapshot", 405, "GET,HEAD"),
    ("PATCH", "/llmhealth", 405, "GET,HEAD"),
    ("OPTIONS", "/llmhealth-monitor", 405, "GET,HEAD"),
    ("GET", "/llmhealth-other", 404, None),
    ("GET", "/%68ealth", 200, None),  # the decoded path is what counts: this is /health
]


@pytest.mark.parametrize(("method", "path", "status", "allow"), CASES)
async def test_an_own_path_is_answered_by_the_balancer_whatever_the_method(
    method: str, path: str, status: int, allow: str | None
) -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        before = dict(fake.stats["requests"])
        url = balancer.url + path
        async with session.request(method, URL(url, encoded=True), data=b"{}") as reply:
            assert reply.status == status, await reply.text()
            assert reply.content_type == "application/json"
            if status != 200:
                error = (await reply.json())["error"]
                assert error["code"] == ("method_not_allowed" if status == 405 else "not_found")
                assert error["message"] and error["type"]
                assert reply.headers["X-Request-ID"]
            if allow is not None:
                assert reply.headers["Allow"] == allow
        # The health poller's own probes aside, the backend saw nothing of it.
        probes = {"/health", "/slots", "/metrics", "/props", "/v1/models"}
        seen = {p: n for p, n in fake.stats["requests"].items() if before.get(p) != n and p not in probes}
        assert seen == {}


async def test_paths_that_only_look_like_own_ones_still_go_to_a_backend() -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        for path in ("/health/x", "/metricsx", "/administrator", "/v1/health"):
            async with session.get(balancer.url + path) as reply:
                assert reply.headers["Server"] == "llama.cpp", path  # the fake's answer, relayed
