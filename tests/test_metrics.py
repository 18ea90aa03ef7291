"""``GET /metrics``: Prometheus exposition that parses, follows the naming rules and moves with traffic."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llmbalancer.testing.fake_llama import run_fake_fleet
from tests.fake_processes import fake_fleet_processes
from tests.support import make_config, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return await reply.text()


async def test_request_counters_and_histograms_move_as_requests_pass() -> None:
    async with (
        run_fake_fleet(2) as fakes,
        run_balancer(make_config([f"{fakes[0].url}=a", f"{fakes[1].url}=b"])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        before = _samples(await _scrape(session, balancer.url))
        for stream in (False, True, False, True):
            async with session.post(balancer.url + "/v1/chat/completions", json={**CHAT, "stream": stream}) as reply:
                assert reply.status == 200
                await reply.read()
        await wait_for(lambda: balancer.components.recent.observed == 4, timeout=5)
        after = _samples(await _scrape(session, balancer.url))

        moved = sum(
            _value(after, "llmbalancer_requests_total", backend=b, model="smollm2", status="200")
            - _value(before, "llmbalancer_requests_total", backend=b, model="smollm2", status="200")
            for b in ("a", "b")
        )
        assert moved == 4
        durations = sum(_value(after, "llmbalancer_request_duration_seconds_count", backend=b) for b in "ab")
        assert durations == 4
        first_tokens = sum(_value(after, "llmbalancer_time_to_first_token_seconds_count", backend=b) for b in "ab")
        assert first_tokens == 4
        assert _value(after, "llmbalancer_request_duration_seconds_sum", backend="a") > 0


async def test_fleet_gauges_are_read_at_scrape_time(tmp_path: Path) -> None:
    with fake_fleet_processes(tmp_path) as fakes:
        async with (
            run_balancer(make_config([f"{fakes[0].url}=a", f"{fakes[1].url}=b"])) as balancer,
            aiohttp.ClientSession() as session,
        ):
            samples = _samples(await _scrape(session, balancer.url))
            for name in ("a", "b"):
                assert _value(samples, "llmbalancer_backend_up", backend=name) == 1.0
                assert _value(samples, "llmbalancer_backend_state", backend=name, state="healthy") == 1.0
                assert _value(samples, "llmbalancer_backend_state", backend=name, state="unhealthy") == 0.0
                assert ("llmbalancer_backend_in_flight", frozenset({("backend", name)})) in samples
            assert ("llmbalancer_queue_depth", frozenset()) in samples
            assert ("llmbalancer_gpu_utilization_max_ratio", frozenset()) in samples

            fakes[1].stop()
            registry = balancer.components.registry
            await wait_for(lambda: not registry.get("b").routable, timeout=10)  # type: ignore[union-attr]
            samples = _samples(await _scrape(session, balancer.url))
    assert _value(samples, "llmbalancer_backend_up", backend="b") == 0.0
    assert _value(samples, "llmbalancer_backend_state", backend="b", state="unhealthy") == 1.0
    assert _value(samples, "llmbalancer_backend_up", backend="a") == 1.0


async def test_metric_names_follow_prometheus_conventions() -> None:
    async with (
        run_fake_fleet(1) as fakes,
        run_balancer(make_config([fakes[0].url])) as balancer,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
            await reply.read()
        families = list(text_string_to_metric_families(await _scrape(session, balancer.url)))
    names = {family.name for family in families}
    assert names, "no metrics exposed"
    for family in families:
        assert family.name.startswith("llmbalancer_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        # Base units only: seconds and bytes, never milliseconds or megabytes.
        assert not any(unit in family.name for unit in ("_ms", "milliseconds", "_mb", "megabytes")), family.name
    for expected in (
        "llmbalancer_requests", "llmbalancer_request_duration_seconds", "llmbalancer_time_to_first_token_seconds",
        "llmbalancer_prompt_tokens", "llmbalancer_completion_tokens", "llmbalancer_retries",
        "llmbalancer_queue_wait_seconds", "llmbalancer_queue_depth", "llmbalancer_backend_up",
        "llmbalancer_backend_state", "llmbalancer_backend_in_flight", "llmbalancer_backend_slots_busy",
        "llmbalancer_backend_slots_total", "llmbalancer_circuit_opens", "llmbalancer_supervisor_restarts",
        "llmbalancer_gpu_utilization_max_ratio",
    ):
        assert expected in names, expected
