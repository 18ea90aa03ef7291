"""kill -9 of one supervised real llama-server under a steady request stream: no request fails, it comes back."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp

from llmbalancer.supervisor.instances import InstanceStatus
from tests.support import free_port, llama_server_command, make_config, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
WORKERS = 4


async def test_kill_9_of_one_instance_under_load_fails_no_request_and_it_rejoins_within_10_s(
    tmp_path: Path,
) -> None:
    commands = tmp_path / "commands.txt"
    commands.write_text("".join(shlex.join(llama_server_command(free_port())) + "\n" for _ in range(2)))
    config = make_config(
        [],
        **{"supervisor.commands_file": str(commands), "supervisor.output_dir": str(tmp_path / "outputs")},
    )
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, url: str) -> None:
        # Non-streaming: no byte reaches the client before the answer is complete, so every request
        # caught on the killed server must be retried on the other one.
        for _ in range(2000):
            if stop.is_set():
                return
            async with session.post(url + "/v1/chat/completions", json=CHAT) as reply:
                await reply.read()
                statuses[reply.status] += 1

    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        supervisor = balancer.components.supervisor
        assert supervisor is not None
        victim, other = supervisor.instances.values()
        await wait_for(lambda: victim.backend.routable and other.backend.routable, timeout=60)
        workers = [asyncio.create_task(client(session, balancer.url)) for _ in range(WORKERS)]
        try:
            await wait_for(lambda: victim.backend.traffic.in_flight > 0 and sum(statuses.values()) >= 4, timeout=30)
            assert victim.process is not None
            killed_pid = victim.process.pid
            os.kill(killed_pid, signal.SIGKILL)
            killed_at = time.monotonic()

            await wait_for(lambda: victim.process is not None and victim.process.pid != killed_pid, timeout=10)
            await wait_for(lambda: victim.backend.routable, timeout=10 - (time.monotonic() - killed_at))
            assert victim.status is InstanceStatus.RUNNING and victim.restarts == 1
            # Back in rotation: it takes requests of the stream again.
            rejoined_total = victim.backend.traffic.requests_total
            await wait_for(lambda: victim.backend.traffic.requests_total > rejoined_total + 2, timeout=15)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    assert set(statuses) == {200}, statuses
    assert victim.last_exit is not None
    assert "killed by SIGKILL" in victim.output.path.read_text()
