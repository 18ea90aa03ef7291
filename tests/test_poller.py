"""What one health probe reads from each kind of backend, and how the poller judges state over its window."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import aiohttp

from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.health_poller import _Window, judge
from llmbalancer.fleet.probes import Observation, ProbeMemory, probe
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_llama
from llmbalancer.testing.fake_ollama import run_fake_ollama
from tests.support import LlamaServer, free_port, llama_server_command, wait_ready


async def _probe(backend: Backend, memory: ProbeMemory | None = None) -> Observation:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        return await probe(session, backend, memory or ProbeMemory())


async def test_a_real_llama_server_reports_its_slots_and_model(llama_fleet: list[LlamaServer]) -> None:
    seen = await _probe(Backend("real", llama_fleet[0].url))
    assert seen.ok is True
    assert seen.slots_total == 2 and seen.slots_busy is not None
    assert seen.models == ("smollm2",)


def _start_without_slots(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    with (tmp_path / "no-slots.log").open("wb") as log:
        return subprocess.Popen([*llama_server_command(port), "--no-slots"], stdout=log, stderr=subprocess.STDOUT)


async def test_without_the_slots_endpoint_the_metrics_and_props_are_read(tmp_path: Path) -> None:
    port = free_port()
    process = _start_without_slots(tmp_path, port)
    try:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_ready, url, 60.0)
        memory = ProbeMemory()
        seen = await _probe(Backend("no-slots", url), memory)
        assert seen.ok is True and not memory.slots_endpoint
        assert seen.slots_total == 2 and seen.slots_busy == 0 and seen.deferred == 0
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_llamafiles_older_health_carries_the_slot_counts() -> None:
    config = FakeLlamaConfig(slots=3, legacy_health=True, token_delay=0.2, max_tokens_default=4)
    async with run_fake_llama(config) as fake, aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(
            fake.url + "/completion", json={"prompt": "hi", "n_predict": 4}
        ))
        for _ in range(100):  # bounded: until the request holds its slot
            if fake.stats["processing"]:
                break
            await asyncio.sleep(0.01)
        seen = await _probe(Backend("llamafile", fake.url, kind="llamafile"))
        assert seen.ok is True and seen.slots_total == 3 and seen.slots_busy == 1
        (await request).close()


async def test_a_loading_server_is_starting_and_ollama_is_read_from_api_ps() -> None:
    async with run_fake_llama(FakeLlamaConfig(load_time=5.0)) as loading, run_fake_ollama() as ollama:
        assert (await _probe(Backend("loading", loading.url))).ok is None
        seen = await _probe(Backend("ollama", ollama.url, kind="ollama"))
        assert seen.ok is True and seen.slots_total is None
        auto = await _probe(Backend("auto", ollama.url))  # no /health: judged by /v1/models
        assert auto.ok is True and auto.models == ("smollm2:latest",)


def test_a_refused_connection_ejects_at_once_other_failures_after_two_in_a_row() -> None:
    window = _Window(5.0)
    window.add(True)
    timeout = Observation(False, "timed out")
    window.add(False)
    assert judge(window, timeout) == (None, "")  # one slow probe: keep the current state
    window.add(False)
    assert judge(window, timeout)[0] is BackendState.UNHEALTHY
    fresh = _Window(5.0)
    fresh.add(False)
    assert judge(fresh, Observation(False, "refused", refused=True))[0] is BackendState.UNHEALTHY


def test_a_flapping_backend_stays_out_until_its_window_is_steady() -> None:
    window = _Window(5.0)
    for outcome in (True, False, True, False, True):
        window.add(outcome)
    assert judge(window, Observation(True))[0] is BackendState.UNHEALTHY
    steady = _Window(5.0)
    for outcome in (True, False, False, True):  # one outage, then recovery: back at once
        steady.add(outcome)
    assert judge(steady, Observation(True))[0] is BackendState.HEALTHY


def test_busy_means_every_slot_busy_over_the_whole_window() -> None:
    window = _Window(0.2)
    assert not window.saturated(True)  # full at one poll: not busy yet
    time.sleep(0.25)
    assert window.saturated(True)  # full at every poll for the whole window
    assert not window.saturated(False)  # one free slot ends it at once
    assert not window.saturated(True)  # and the window starts again
    assert _Window(0.0).saturated(True)


async def test_an_auto_backend_ready_without_llama_cpp_health_json_is_plain_openai() -> None:
    """vLLM answers /health 200 with an empty body: ready, and only the OpenAI API (asked for usage)."""
    async with run_fake_llama(FakeLlamaConfig(plain_openai=True)) as vllm, run_fake_llama() as llama:
        seen = await _probe(Backend(name="vllm", url=vllm.url))
        assert seen.ok is True and seen.kind == "openai"
        seen = await _probe(Backend(name="llama", url=llama.url))
        assert seen.ok is True and seen.kind is None and seen.slots_total == 2
