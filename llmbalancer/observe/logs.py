"""structlog set-up: human console lines on a terminal, JSON lines otherwise."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from llmbalancer.config import LoggingConfig


def configure_logging(config: LoggingConfig) -> None:
    use_console = config.format == "console" or (config.format == "auto" and sys.stderr.isatty())
    renderers: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
        if use_console
        # exc_info as the traceback's text under "exception" (the console renderer prints it its own way).
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_dumps)]
    )
    level = getattr(logging, config.level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _IsoUtcTimestamp(),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=_batched(sys.stderr)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # aiohttp's own loggers go through the standard library: keep them quiet but visible.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")


def _dumps(event: dict[str, Any], default: Callable[[Any], Any] | None = None, **kw: Any) -> str:
    """orjson, several times faster than json.dumps on the one access event every request writes; the
    standard library for what orjson refuses (an integer over 64 bits, say)."""
    try:
        return orjson.dumps(event, default=default).decode()
    except orjson.JSONEncodeError:
        return json.dumps(event, default=default, **kw)


class _TurnBatchedFile:
    """What structlog writes to: lines logged in one turn of the event loop reach the file in one write,
    at the end of that turn (under load, one write syscall for many access events instead of one each).
    Outside a running loop (start-up, another thread) every flush writes at once."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def write(self, text: str) -> int:
        with self._lock:
            self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.drain()
            return
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self.drain)

    def drain(self) -> None:
        with self._lock:
            self._scheduled_on = None
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            self._file.write(text)
            self._file.flush()


_files: dict[int, _TurnBatchedFile] = {}


def _batched(file: TextIO) -> _TurnBatchedFile:
    batched = _files.get(id(file))
    if batched is None:
        batched = _files[id(file)] = _TurnBatchedFile(file)
        atexit.register(batched.drain)
    return batched


def flush_logs() -> None:
    """Write what is pending now (before ``os._exit``, which skips the end of the loop's turn)."""
    for batched in _files.values():
        batched.drain()


class _IsoUtcTimestamp:
    """As structlog's ``TimeStamper(fmt="iso", utc=True)`` (``2026-01-02T03:04:05.678901Z``), with the date
    and time of day formatted once per second rather than through a datetime per event."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # (whole second, its formatted date and time), replaced whole: thread-safe

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        event_dict["timestamp"] = f"{prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict
