"""Local GPU load through NVML (the ``pynvml`` module), behind a small wrapper.

No NVIDIA GPU, no driver or no library is a state ("NVML unavailable", utilisation 0 %), never a
crash: the balancer runs the same on a laptop. ``GpuSampler`` is the service that reads every GPU
once per interval and keeps the last ``window`` seconds, which is what ``/llmhealth`` judges.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import structlog

from llmbalancer.config import GpuConfig

log = structlog.get_logger("llmbalancer.observe.gpu")

NVML_UNAVAILABLE = "NVML unavailable"


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int

    def describe(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "utilization_pct": self.utilization_pct,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_total_bytes": self.memory_total_bytes,
        }


@dataclass(frozen=True, slots=True)
class GpuSample:
    time: float  # wall clock, seconds since the epoch
    gpus: tuple[GpuReading, ...]

    @property
    def max_utilization(self) -> float:
        return max((gpu.utilization_pct for gpu in self.gpus), default=0.0)


class Nvml:
    """Reads every GPU per call. NVML is initialised on first use; a failure to initialise is final
    (a driver does not appear under a running process), a device that fails one read is skipped."""

    def __init__(self, module: Any = None) -> None:
        # `module` stands in for `pynvml` in tests without a GPU (the one boundary we mock).
        self._module: Any = module
        self._initialised = False
        self.error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None

    def _init(self) -> Any:
        if self._module is None:
            import pynvml  # the nvidia-ml-py distribution; imports fine without a driver

            self._module = pynvml
        self._module.nvmlInit()
        self._initialised = True
        return self._module

    def read(self) -> tuple[GpuReading, ...]:
        if self.error is not None:
            return ()
        try:
            nvml = self._module if self._initialised else self._init()
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            self.error = f"{NVML_UNAVAILABLE}: {_describe(exc)}"
            log.info("gpu_nvml_unavailable", error=self.error)
            return ()
        readings = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
            except Exception:  # a GPU fallen off the bus or in reset: the others still count
                continue
            readings.append(
                GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    utilization_pct=float(utilization.gpu),
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                )
            )
        return tuple(readings)

    def close(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._module.nvmlShutdown()
            except Exception as exc:
                log.debug("gpu_nvml_shutdown_failed", error=_describe(exc))


@dataclass(frozen=True, slots=True)
class GpuLoad:
    """What ``/llmhealth`` answers: the verdict over the window and what it was judged on."""

    status: str  # "idle" | "busy"
    max_utilization_pct: float
    threshold_pct: float
    window_s: float
    nvml_available: bool
    nvml_error: str | None
    gpus: tuple[GpuReading, ...]  # the latest reading


class GpuSampler:
    """Service: samples the GPUs every ``interval`` and keeps the samples of the last ``window``."""

    name = "gpu-sampler"

    def __init__(self, config: GpuConfig, nvml: Nvml | None = None) -> None:
        self.nvml = nvml or Nvml()
        self._interval = config.interval
        self._window = config.window
        self._threshold = config.busy_threshold
        self._samples: deque[GpuSample] = deque()

    def sample_once(self) -> GpuSample:
        sample = GpuSample(time.time(), self.nvml.read())
        self._samples.append(sample)
        horizon = sample.time - self._window
        while self._samples and self._samples[0].time < horizon:
            self._samples.popleft()
        return sample

    async def run(self) -> None:
        try:
            while True:
                if self.nvml.available:
                    # NVML calls block (initialisation can take a second): keep them off the loop.
                    await asyncio.to_thread(self.sample_once)
                else:
                    self.sample_once()
                await asyncio.sleep(self._interval)
        finally:
            self.nvml.close()

    @property
    def samples(self) -> list[GpuSample]:
        return list(self._samples)

    def load(self) -> GpuLoad:
        samples = self.samples
        peak = max((sample.max_utilization for sample in samples), default=0.0)
        # Without NVML there is no load to speak of: idle, whatever the threshold.
        busy = self.nvml.available and bool(samples) and peak >= self._threshold
        return GpuLoad(
            status="busy" if busy else "idle",
            max_utilization_pct=peak,
            threshold_pct=self._threshold,
            window_s=self._window,
            nvml_available=self.nvml.available,
            nvml_error=self.nvml.error,
            gpus=samples[-1].gpus if samples else (),
        )


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

