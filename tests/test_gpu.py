"""Local GPU load and ``GET /llmhealth``: NVML stubbed at the ``pynvml`` module boundary, and for real."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from llmbalancer.config import GpuConfig
from llmbalancer.observe.gpu import NVML_UNAVAILABLE, GpuSampler, Nvml
from llmbalancer.testing.fake_llama import run_fake_llama
from tests.support import get_json, make_config, run_balancer, wait_for

GiB = 2**30


class NVMLError(Exception):
    """Stands in for pynvml.NVMLError (e.g. NVMLError_LibraryNotFound on a machine without a driver)."""


class StubNvml:
    """The subset of the ``pynvml`` module llmbalancer calls, with utilisation set by the test."""

    def __init__(self, utilization: list[float], *, broken: bool = False) -> None:
        self.utilization = utilization
        self.broken = broken
        self.failing: set[int] = set()
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.broken:
            raise NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.utilization)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.failing:
            raise NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self.utilization[handle], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * GiB, total=80 * GiB, free=(79 - handle) * GiB)

    def nvmlDeviceGetName(self, handle: int) -> str:
        return f"Stub GPU {handle}"


@pytest.fixture
def stub_pynvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubNvml]:
    stub = StubNvml([10.0, 20.0])
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    yield stub


FAST = {"gpu.interval": 0.05, "gpu.window": 0.5}


async def test_llmhealth_turns_busy_when_gpu_utilisation_reaches_the_threshold(stub_pynvml: StubNvml) -> None:
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url], **FAST)) as balancer,
        aiohttp.ClientSession() as session,
    ):
        url = balancer.url + "/llmhealth"
        body = await get_json(session, url)
        assert body["status"] == "idle"
        assert body["nvml"] == "available"
        assert body["threshold_pct"] == 50.0
        assert [gpu["name"] for gpu in body["gpus"]] == ["Stub GPU 0", "Stub GPU 1"]
        assert body["gpus"][1]["memory_used_bytes"] == 2 * GiB
        assert body["gpus"][1]["memory_total_bytes"] == 80 * GiB

        stub_pynvml.utilization[1] = 85.0
        seen: dict[str, Any] = {}

        async def busy() -> bool:
            seen.update(await get_json(session, url))
            return bool(seen["status"] == "busy")

        await _await_true(busy)
        assert seen["gpu_util_max5s"] == 85.0
        assert seen["window_seconds"] == 0.5

        # Busy holds while the peak is inside the window, then the balancer reads idle again.
        stub_pynvml.utilization[1] = 5.0

        async def idle() -> bool:
            seen.update(await get_json(session, url))
            return bool(seen["status"] == "idle")

        await _await_true(idle)
        assert seen["gpu_util_max5s"] < 50.0


async def test_without_nvml_llmhealth_is_idle_and_says_nvml_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", StubNvml([99.0], broken=True))
    async with (
        run_fake_llama() as fake,
        run_balancer(make_config([fake.url], **FAST)) as balancer,
        aiohttp.ClientSession() as session,
    ):
        await wait_for(lambda: balancer.components.gpu.samples, timeout=5)
        body = await get_json(session, balancer.url + "/llmhealth")
        assert body["status"] == "idle"
        assert body["gpu_util_max5s"] == 0.0
        assert body["nvml"] == "unavailable"
        assert body["nvml_error"].startswith(NVML_UNAVAILABLE)
        assert body["gpus"] == []
        # The balancer itself is unaffected.
        assert (await get_json(session, balancer.url + "/health"))["status"] == "ok"


def test_a_gpu_that_fails_a_read_is_skipped_and_the_others_still_count() -> None:
    stub = StubNvml([90.0, 30.0])
    stub.failing.add(0)
    sampler = GpuSampler(GpuConfig(busy_threshold=50.0), Nvml(stub))
    sample = sampler.sample_once()
    assert [gpu.index for gpu in sample.gpus] == [1]
    assert sampler.load().status == "idle"
    assert sampler.nvml.available


def test_samples_older_than_the_window_are_dropped() -> None:
    stub = StubNvml([70.0])
    sampler = GpuSampler(GpuConfig(window=0.05), Nvml(stub))
    sampler.sample_once()
    assert sampler.load().status == "busy"
    stub.utilization[0] = 0.0
    import time

    time.sleep(0.1)
    sampler.sample_once()
    assert len(sampler.samples) == 1
    assert sampler.load().status == "idle"


def test_nvml_is_shut_down_once_after_use() -> None:
    stub = StubNvml([1.0])
    nvml = Nvml(stub)
    nvml.read()
    nvml.close()
    nvml.close()
    assert stub.shutdowns == 1


def test_real_nvml_reads_this_machine_or_reports_it_unavailable() -> None:
    """No stub: on a machine with an NVIDIA GPU this reads it; without one it is a state, not a crash."""
    nvml = Nvml()
    try:
        readings = nvml.read()
    finally:
        nvml.close()
    if not nvml.available:
        assert readings == ()
        assert nvml.error is not None and nvml.error.startswith(NVML_UNAVAILABLE)
        return
    assert readings, "NVML initialised but reported no GPU"
    for gpu in readings:
        print(f"GPU {gpu.index} {gpu.name}: {gpu.utilization_pct}% busy, "
              f"{gpu.memory_used_bytes / GiB:.1f} of {gpu.memory_total_bytes / GiB:.1f} GiB")
        assert 0.0 <= gpu.utilization_pct <= 100.0
        assert gpu.memory_total_bytes > 0
        assert 0 <= gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert gpu.name


async def _await_true(check: Any, attempts: int = 100) -> None:
    """Bounded: up to `attempts` checks, 50 ms apart."""
    import asyncio

    for _ in range(attempts):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met in time")
