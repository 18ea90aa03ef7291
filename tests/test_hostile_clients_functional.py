"""Nothing a client sends is kept without a bound: a balancer flooded with huge, ever-new model names,
``user`` fields and session headers gives the memory back, and its ``/metrics`` and logs stay small.

A real ``python -m llmbalancer serve`` process (its RSS is what an operator sees) under ``--policy sticky``
in front of two fake llama-servers.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.fake_processes import fake_fleet_processes
from tests.support import REPO, free_port, wait_ready

MIB = 1024 * 1024
HOSTILE = 1000
# aiohttp refuses a header line over 8190 bytes (431): send the largest it takes.
HEADER_VALUE_BYTES = 8000
CONCURRENCY = 8
RSS_SLACK = 16 * MIB


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _filler(index: int, size: int) -> str:
    """A different string of ``size`` characters for each ``index`` (so nothing can be shared)."""
    head = f"{index:08d}-"
    return head + "x" * (size - len(head))


def _hostile(index: int) -> tuple[dict[str, object], dict[str, str]]:
    """Request ``index`` of the flood: a 1 MiB model name, a 1 MiB ``user``, or a maximal X-Session-ID."""
    chat: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    kind = index % 3
    if kind == 0:
        return {**chat, "model": _filler(index, MIB)}, {}
    if kind == 1:
        return {**chat, "model": "smollm2", "user": _filler(index, MIB)}, {}
    return {**chat, "model": "smollm2"}, {"X-Session-ID": _filler(index, HEADER_VALUE_BYTES)}


async def _flood(session: aiohttp.ClientSession, url: str, indexes: range) -> dict[int, int]:
    statuses: dict[int, int] = {}
    pending = iter(indexes)

    async def worker() -> None:
        for index in pending:
            body, headers = _hostile(index)
            data = io.BytesIO(json.dumps(body).encode())
            headers = {"Content-Type": "application/json", **headers}
            async with session.post(url + "/v1/chat/completions", data=data, headers=headers) as reply:
                await reply.read()
                statuses[reply.status] = statuses.get(reply.status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


async def _look(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    """Scrape /metrics and read the snapshot, as a monitor would between floods."""
    async with session.get(url + "/metrics") as reply:
        metrics = await reply.read()
    async with session.get(url + "/llmhealth-snapshot") as reply:
        snapshot = await reply.json()
    return len(metrics), snapshot


async def _exercise(url: str, pid: int) -> None:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        # Warm up: the ring of recent requests filled, every code path and buffer used once.
        await _flood(session, url, range(HOSTILE, HOSTILE + 150))
        await _look(session, url)
        baseline = _rss(pid)

        statuses = await _flood(session, url, range(HOSTILE))
        metrics_size, snapshot = await _look(session, url)
        after = _rss(pid)
    print(
        f"RSS baseline {baseline / MIB:.1f} MiB, after {HOSTILE} hostile requests {after / MIB:.1f} MiB "
        f"({(after - baseline) / MIB:+.1f}); /metrics {metrics_size} bytes; {time.monotonic() - started:.1f} s"
    )
    assert statuses == {404: 334, 200: 666}
    assert metrics_size < MIB
    assert after - baseline <= RSS_SLACK
    sticky = snapshot["sticky_entries"]
    assert isinstance(sticky, int) and sticky >= 666  # the pins are all there, as digests
    recent = snapshot["requests"]
    assert isinstance(recent, list) and recent
    assert all(len(json.dumps(request)) < 2000 for request in recent)


def test_hostile_requests_leave_no_memory_behind(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "balancer.log"
    with fake_fleet_processes(tmp_path) as fakes, log_path.open("wb") as log:
        backends = [f"--backend={fake.url}={name}" for fake, name in zip(fakes, "ab", strict=True)]
        process = subprocess.Popen(
            [sys.executable, "-m", "llmbalancer", "serve", "--port", str(port), "--policy", "sticky",
             "--log-format", "json", *backends],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            # Strict: invented model names are 404 (else this one-model fleet would answer them, as llama-server does).
            env={**os.environ, "LLMBALANCER_ROUTING__STRICT_MODELS": "true"},
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, timeout=20)
            asyncio.run(_exercise(url, process.pid))
        finally:
            process.terminate()
            process.wait(timeout=30)
    # The access log names each request once, never a megabyte at a time.
    assert log_path.stat().st_size < 10 * MIB
