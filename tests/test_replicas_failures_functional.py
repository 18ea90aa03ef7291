"""Replicas degrade, never stop: a replica killed with SIGKILL under load leaves no claim behind past its lease
and the survivor fails nothing; Redis stopped under load fails no request, is said once, and the shared state
is rebuilt when it returns; a Redis that is not there at start-up leaves a replica serving alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import redis as redis_client
from structlog.testing import capture_logs

from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.redis_support import RedisServer, running_redis, two_replicas
from tests.support import REPO, free_port, get_json, make_config, run_balancer, wait_for

CHAT = "/v1/chat/completions"
# The counter's window: counts of a window that ended while Redis was away are left behind by design, and a minute
# window ended during the test about 1 run in 15.
DAY = 86400.0
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 20, "stream": True}


async def _stream(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.post(url + CHAT, json=BODY) as reply:
            body = await reply.read()
            return reply.status if reply.status != 200 or b"[DONE]" in body else -1
    except aiohttp.ClientError:
        return -2


async def _load(http: aiohttp.ClientSession, urls: list[str], outcomes: dict[str, list[int]], stop: asyncio.Event,
                workers: int = 3) -> None:
    async def worker(url: str) -> None:
        while not stop.is_set():
            outcomes[url].append(await _stream(http, url))

    await asyncio.gather(*(worker(url) for url in urls for _ in range(workers)))


@contextlib.contextmanager
def replica_process(
    tmp_path: Path, name: str, port: int, backends: list[str], state: str
) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / f"replica-{name}.log").open("wb")
    command = [sys.executable, "-m", "llmbalancer", "serve", "--port", str(port), "--state", state,
               "--log-format", "json"]
    for backend in backends:
        command += ["--backend", backend]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "LLMBALANCER_STATE__REPLICA": name, "LLMBALANCER_HEALTH__INTERVAL": "0.2"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        log.close()


async def _ready(http: aiohttp.ClientSession, url: str, backends: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            snapshot: dict[str, Any] = await get_json(http, url + "/llmhealth-snapshot")
            healthy = [b for b in snapshot["backends"] if b["state"] == "healthy" and b["slots_total"]]
            if snapshot["state_store"]["up"] and len(healthy) == backends:
                return snapshot
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready")


async def _elsewhere(http: aiohttp.ClientSession, url: str) -> int:
    snapshot = await get_json(http, url + "/llmhealth-snapshot")
    return sum(b["in_flight_elsewhere"] for b in snapshot["backends"])


async def test_a_replica_killed_with_sigkill_frees_its_claims_within_the_lease(tmp_path: Path) -> None:
    lease, heartbeat = 3.0, 1.0  # the defaults
    with running_redis(tmp_path) as redis:
        async with run_fake_fleet(2, FakeLlamaConfig(slots=2, token_delay=0.02)) as fakes:
            backends = [f"{fakes[0].url}=x", f"{fakes[1].url}=y"]
            port_a, port_b = free_port(), free_port()
            url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
            with (
                replica_process(tmp_path, "A", port_a, backends, redis.url) as process_a,
                replica_process(tmp_path, "B", port_b, backends, redis.url),
            ):
                timeout = aiohttp.ClientTimeout(total=60)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    await _ready(http, url_a, 2)
                    await _ready(http, url_b, 2)
                    outcomes: dict[str, list[int]] = {url_a: [], url_b: []}
                    stop = asyncio.Event()
                    load = asyncio.create_task(_load(http, [url_a, url_b], outcomes, stop))
                    try:
                        # B sees A's requests in flight (A holds slots), then A dies with them.
                        deadline = time.monotonic() + 10
                        while await _elsewhere(http, url_b) == 0:
                            assert time.monotonic() < deadline, "B never saw A's requests in flight"
                            await asyncio.sleep(0.02)
                        process_a.kill()
                        process_a.wait(timeout=5)
                        killed = time.monotonic()
                        served_before = len(outcomes[url_b])
                        while await _elsewhere(http, url_b) > 0:
                            assert time.monotonic() - killed < lease + heartbeat + 1.0, "A's claims outlived its lease"
                            await asyncio.sleep(0.05)
                        freed_after = time.monotonic() - killed
                        await asyncio.sleep(1.5)  # B goes on serving with the fleet's every slot
                    finally:
                        stop.set()
                        await load
                    survivor = outcomes[url_b]
                    assert survivor and all(status == 200 for status in survivor), survivor
                    assert len(survivor) > served_before
                    assert freed_after <= lease + heartbeat + 1.0
                    store = redis_client.Redis(port=redis.port)
                    try:
                        assert store.exists("llmb:slots:A") == 0
                    finally:
                        store.close()


async def test_redis_stopped_under_load_fails_no_request_and_the_state_resyncs_after_it_returns(
    tmp_path: Path,
) -> None:
    with running_redis(tmp_path) as redis, capture_logs() as logs:
        async with (
            run_fake_fleet(3, FakeLlamaConfig(slots=2, token_delay=0.01)) as fakes,
            two_replicas(redis, [f"{fakes[0].url}=x", f"{fakes[1].url}=y"],
                         **{"policy.name": "sticky:prefix"}) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            ra, rb = a.components.replicas, b.components.replicas
            assert ra is not None and rb is not None
            outcomes: dict[str, list[int]] = {a.url: [], b.url: []}
            stop = asyncio.Event()
            load = asyncio.create_task(_load(http, [a.url, b.url], outcomes, stop, workers=2))
            try:
                await asyncio.sleep(1.0)
                redis.stop()
                await wait_for(lambda: not ra.store.up and not rb.store.up, timeout=3)
                # While Redis is away: each replica serves alone, and changes made here wait for its return.
                async with http.post(a.url + "/admin/backends", json={"url": fakes[2].url, "name": "late"}) as reply:
                    assert reply.status == 201
                assert await a.components.counters.incr("key:k", 5, window_s=DAY) == 5
                async with http.get(b.url + "/metrics") as reply:
                    assert "llmbalancer_state_store_up 0.0" in await reply.text()
                snapshot = await get_json(http, a.url + "/llmhealth-snapshot")
                assert snapshot["state_store"]["up"] is False and snapshot["state_store"]["error"]
                await asyncio.sleep(1.0)
                redis.start()  # the same port, empty: the replicas rebuild what they share
                await wait_for(lambda: ra.store.up and rb.store.up, timeout=5)
                await wait_for(lambda: (late := b.components.registry.get("late")) is not None and late.routable,
                               timeout=3)
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                await load
            store = redis_client.Redis(port=redis.port)
            try:
                assert set(store.hkeys("llmb:replicas")) == {b"A", b"B"}
                assert {b"x", b"y", b"late"} <= set(store.hkeys("llmb:fleet"))
                assert json.loads(store.hget("llmb:fleet", "late") or b"{}")["source"] == "api"
            finally:
                store.close()
            assert await b.components.counters.get("key:k", window_s=DAY) == 5  # counted while away, added on return
    for url, statuses in outcomes.items():
        assert statuses and all(status == 200 for status in statuses), (url, statuses)
    downs = [e for e in logs if e["event"] == "state_store_down"]
    ups = [e for e in logs if e["event"] == "state_store_up"]
    assert len(downs) == 2  # said once by each replica
    assert len(ups) == 4  # at start and on return, by each


async def test_a_replica_whose_redis_is_not_there_serves_alone_and_joins_when_it_comes(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis.log")
    try:
        with capture_logs() as logs:
            async with (
                run_fake_fleet(1) as fakes,
                run_balancer(make_config([fakes[0].url], **{"state.url": redis.url, "state.replica": "A"})) as a,
                aiohttp.ClientSession() as http,
            ):
                for _ in range(3):
                    async with http.post(a.url + CHAT, json={**BODY, "stream": False}) as reply:
                        assert reply.status == 200
                snapshot = await get_json(http, a.url + "/llmhealth-snapshot")
                assert snapshot["state_store"]["up"] is False
                assert [r["id"] for r in snapshot["replicas"]] == ["A"]
                redis.start()
                replicas = a.components.replicas
                assert replicas is not None
                await wait_for(lambda: replicas.store.up, timeout=3)
        assert len([e for e in logs if e["event"] == "state_store_unreachable"]) == 1
    finally:
        redis.stop()
