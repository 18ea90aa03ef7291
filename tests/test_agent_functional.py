"""`llmbalancer agent` as a real process, in front of a real llama-server (and the fake), registering with a
balancer on a real socket: registration only once ready, removal after agents.ttl, deregistration on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from llmbalancer.fleet.backend import Backend, BackendState
from tests.fake_processes import start_fake_process
from tests.support import REPO, free_port, make_config, run_balancer, start_llama_server, wait_for, wait_ready

TOKEN = "agent-test-token"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


def start_agent(tmp_dir: Path, local: str, balancer: str, name: str, *extra: str) -> subprocess.Popen[bytes]:
    log_path = tmp_dir / f"agent-{name}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "llmbalancer", "agent", "--local", local, "--balancer", balancer,
             "--name", name, "--token", TOKEN, "--log-format", "json", *extra],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


async def test_an_agent_registers_a_real_llama_server_only_once_ready_and_it_leaves_within_ttl_after_kill_9(
    tmp_path: Path,
) -> None:
    port = free_port()
    local = f"http://127.0.0.1:{port}"
    config = make_config([], **{"admin.token": TOKEN, "agents.ttl": 3.0})
    agents: list[subprocess.Popen[bytes]] = []
    server = None
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        registry = balancer.components.registry
        try:
            agents.append(start_agent(tmp_path, local, balancer.url, "llama", "--interval", "0.5"))
            await asyncio.sleep(2.0)
            assert registry.get("llama") is None  # nothing answers there yet: not registered
            server = start_llama_server(tmp_path, port=port)
            seen: list[tuple[Backend, BackendState]] = []

            def registered() -> bool:
                backend = registry.get("llama")
                if backend is not None and not seen:
                    seen.append((backend, backend.state))
                return backend is not None

            await wait_for(registered, timeout=90, interval=0.01)
            backend, first_state = seen[0]
            assert first_state is BackendState.HEALTHY  # its first heartbeat said ready: never registered before
            assert backend.source == "agent" and backend.url == local
            assert backend.health.slots_total == 2 and "smollm2" in backend.health.served_models
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200
            assert backend.traffic.requests_total == 1

            agents[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await wait_for(lambda: registry.get("llama") is None, timeout=6, interval=0.02)
            assert time.monotonic() - killed <= 3.0 + 1.0

            agents.append(start_agent(tmp_path, local, balancer.url, "llama", "--interval", "0.5"))
            await wait_for(lambda: (b := registry.get("llama")) is not None and b.routable, timeout=10)
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200

            agents[1].send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            assert await asyncio.to_thread(agents[1].wait, 10) == 0
            await wait_for(lambda: registry.get("llama") is None, timeout=2)
            assert time.monotonic() - stopped < 3.0  # deregistered, not expired
        finally:
            for agent in agents:
                _stop(agent)
            if server is not None:
                server.stop()


async def test_an_agent_whose_server_stops_answering_reports_it_not_ready_at_once(tmp_path: Path) -> None:
    fake = start_fake_process(tmp_path)
    agent = None
    try:
        wait_ready(fake.url, timeout=20)
        async with run_balancer(make_config([], **{"admin.token": TOKEN, "agents.ttl": 30.0})) as balancer:
            agent = start_agent(tmp_path, fake.url, balancer.url, "fake", "--interval", "0.3")
            registry = balancer.components.registry
            await wait_for(lambda: (b := registry.get("fake")) is not None and b.routable, timeout=20)
            backend = registry.get("fake")
            assert backend is not None
            fake.kill()
            stopped = time.monotonic()
            await wait_for(lambda: not backend.routable, timeout=5, interval=0.01)
            assert time.monotonic() - stopped < 1.0  # within about one interval, not after agents.ttl
            assert backend.state is BackendState.UNHEALTHY and registry.get("fake") is backend
    finally:
        if agent is not None:
            _stop(agent)
        fake.stop()


async def test_with_wait_for_backends_a_request_waits_for_an_agent_that_registers_5_s_later(tmp_path: Path) -> None:
    fake = start_fake_process(tmp_path)
    agent = None
    try:
        wait_ready(fake.url, timeout=20)
        config = make_config([], **{"admin.token": TOKEN, "queue.wait_for_backends": True, "queue.timeout": 30.0})
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            started = time.monotonic()
            request = asyncio.create_task(session.post(balancer.url + "/v1/chat/completions", json=CHAT))
            await wait_for(lambda: balancer.components.dispatcher.queue_depth == 1, timeout=5)
            await asyncio.sleep(5.0 - (time.monotonic() - started))
            assert not request.done()
            agent = start_agent(tmp_path, fake.url, balancer.url, "late", "--interval", "0.5")
            async with await asyncio.wait_for(request, 30) as reply:
                assert reply.status == 200
                assert (await reply.json())["choices"][0]["message"]["content"]
            assert time.monotonic() - started >= 5.0
    finally:
        if agent is not None:
            _stop(agent)
        fake.stop()
