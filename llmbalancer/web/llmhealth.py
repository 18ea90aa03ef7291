"""``GET /llmhealth``: this balancer's own load, in llama-balancer's contract.

``status`` is ``idle`` or ``busy``: busy when the highest GPU utilisation sampled over the last
``window_seconds`` reaches the threshold (default 50 %). ``gpu_util_max5s`` and ``window_seconds``
are the fields llama-balancer reads; the rest is ours. Without NVML the load is 0 % and idle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from llmbalancer.observe.gpu import GpuSampler


def llmhealth_body(sampler: GpuSampler) -> dict[str, object]:
    load = sampler.load()
    return {
        "status": load.status,
        "gpu_util_max5s": load.max_utilization_pct,
        "window_seconds": load.window_s,
        "threshold_pct": load.threshold_pct,
        "nvml": "available" if load.nvml_available else "unavailable",
        "nvml_error": load.nvml_error,
        "gpus": [gpu.describe() for gpu in load.gpus],
    }


def llmhealth_handler(sampler: GpuSampler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def llmhealth(request: web.Request) -> web.Response:
        return web.json_response(llmhealth_body(sampler), headers={"Cache-Control": "no-store"})

    return llmhealth
