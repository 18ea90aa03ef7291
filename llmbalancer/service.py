"""Background work runs only as services: a name and ``run()``, started and stopped by the app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import structlog

log = structlog.get_logger("llmbalancer.service")


class Service(Protocol):
    name: str

    async def run(self) -> None:
        """Work until cancelled; cancellation is the only way a service is stopped."""


@contextlib.asynccontextmanager
async def running(services: Sequence[Service]) -> AsyncIterator[None]:
    """Run the services for the duration of the block; on exit cancel each (in reverse) and await it."""
    tasks = [asyncio.create_task(service.run(), name=service.name) for service in services]
    for task in tasks:
        task.add_done_callback(_report_crash)
    try:
        yield
    finally:
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("service_crashed", service=task.get_name(), error=repr(task.exception()))
