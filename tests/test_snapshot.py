"""``GET /llmhealth-snapshot``: every documented field is present, and the data follows the fleet."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from llmbalancer.observe.snapshot import BACKEND_FIELDS, REQUEST_FIELDS, TOP_LEVEL_FIELDS
from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.fake_processes import fake_fleet_processes
from tests.support import REPO, get_json, make_config, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _documented_fields() -> set[str]:
    """Field names written as `name` in the README's Monitoring section."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## Monitoring\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match, "README.md has no '## Monitoring' section"
    return set(re.findall(r"`([a-z_][a-z0-9_.]*)`", match.group(1)))


def test_every_snapshot_field_is_documented_in_the_readme() -> None:
    documented = _documented_fields()
    for name in (*TOP_LEVEL_FIELDS, *BACKEND_FIELDS, *REQUEST_FIELDS):
        assert name in documented, f"snapshot field {name!r} is not documented in README.md's Monitoring section"


async def test_snapshot_shows_each_backend_and_the_requests_that_passed() -> None:
    async with (
        run_fake_fleet(2) as fakes,
        run_balancer(make_config([f"{fakes[0].url}=a", f"{fakes[1].url}=b"])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(3):
            async with session.post(balancer.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as reply:
                assert reply.status == 200
                await reply.read()
        await wait_for(lambda: balancer.components.recent.observed == 3, timeout=5)
        async with session.get(balancer.url + "/llmhealth-snapshot") as reply:
            assert reply.status == 200
            assert reply.headers["Cache-Control"] == "no-store"
            snapshot = await reply.json()

    assert tuple(snapshot) == TOP_LEVEL_FIELDS
    assert snapshot["schema_version"] == 1
    backends = {b["name"]: b for b in snapshot["backends"]}
    assert set(backends) == {"a", "b"}
    for name, fake in zip("ab", fakes, strict=True):
        backend = backends[name]
        assert tuple(backend) == BACKEND_FIELDS
        assert backend["url"] == fake.url
        assert backend["state"] == "healthy"
        assert backend["routable"] is True
        assert backend["in_flight"] == 0
    assert sum(b["requests_total"] for b in backends.values()) == 3
    assert any(b["ttft_avg_s"] is not None and b["latency_avg_s"] is not None for b in backends.values())

    requests = snapshot["requests"]
    assert len(requests) == 3
    for request in requests:
        assert tuple(request) == REQUEST_FIELDS
        assert request["model"] == "smollm2"
        assert request["backend"] in {"a", "b"}
        assert request["status"] == 200
        assert request["path"] == "/v1/chat/completions"
        assert 0 <= request["ttft_s"] <= request["duration_s"]
    assert requests[0]["time"] >= requests[-1]["time"]  # newest first

    assert set(snapshot["queue"]) == {"depth", "capacity", "timeout_s", "by_model"}
    gpu = snapshot["gpu"]
    assert gpu["status"] in {"idle", "busy"}
    assert isinstance(gpu["samples"], list)


async def test_snapshot_shows_a_stopped_backend_leave_rotation_with_its_reason(tmp_path: Path) -> None:
    with fake_fleet_processes(tmp_path) as fakes:
        async with (
            run_balancer(make_config([f"{fakes[0].url}=a", f"{fakes[1].url}=b"])) as balancer,
            aiohttp.ClientSession() as session,
        ):
            fakes[1].stop()
            registry = balancer.components.registry
            await wait_for(lambda: not registry.get("b").routable, timeout=10)  # type: ignore[union-attr]
            snapshot = await get_json(session, balancer.url + "/llmhealth-snapshot")
    backends = {b["name"]: b for b in snapshot["backends"]}
    assert backends["b"]["state"] == "unhealthy"
    assert backends["b"]["routable"] is False
    assert backends["b"]["state_reason"]
    assert backends["a"]["state"] == "healthy"


async def test_recent_requests_are_bounded_by_the_configured_size() -> None:
    async with (
        run_fake_fleet(1) as fakes,
        run_balancer(make_config([fakes[0].url], **{"monitor.recent_requests": 2})) as balancer,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(4):
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                await reply.read()
        await wait_for(lambda: balancer.components.recent.observed == 4, timeout=5)
        snapshot = await get_json(session, balancer.url + "/llmhealth-snapshot")
    assert len(snapshot["requests"]) == 2
