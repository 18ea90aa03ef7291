"""Faults on cue: what a fault is, the switch that holds the one in force, and how it is applied.

Modes: `none`; `error_500` (an HTTP error with a llama-style JSON body, `status` default 500);
`close_immediately` (abort the connection before any byte); `hang` (never answer until the fault is
changed or the server stops; with `after_tokens` it stalls mid-stream while holding its slot);
`crash_mid_stream` (abort the TCP connection after `after_tokens` tokens, default 2: a truncated
chunked response; a non-streaming request is aborted before any byte); `loading` (503 Loading model).
`paths`: where the fault applies; default the generation endpoints (`loading`: every path), `["*"]`
for every path. `count`: how many requests it applies to before it resets itself (default: until reset).

A fault is applied in two places: before the handler (`answer_early`: errors, closes, a hang that is
not mid-stream), and between tokens (`mid_stream` / `fault_points`, read by `generation`).
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from aiohttp import web

from llmbalancer.testing.fake_llama.wire import LOADING_BODY, abort, api_error, check_alive, json_response

FaultMode = Literal["none", "crash_mid_stream", "hang", "error_500", "close_immediately", "loading"]
FAULT_MODES: tuple[str, ...] = get_args(FaultMode)

GENERATION_PATHS: frozenset[str] = frozenset(
    {"/v1/chat/completions", "/chat/completions", "/completion", "/completions", "/v1/completions"}
)


@dataclass(frozen=True)
class Fault:
    """A fault to inject; see the module docstring for the modes."""

    mode: FaultMode = "none"
    after_tokens: int | None = None
    count: int | None = None
    status: int = 500
    message: str = "fake llama-server: injected error"
    paths: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(FAULT_MODES)}")
        if self.after_tokens is not None and self.after_tokens < 0:
            raise ValueError("after_tokens must be >= 0")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1")
        if not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")

    def applies_to(self, path: str) -> bool:
        if self.mode == "none":
            return False
        if self.paths is None:
            return self.mode == "loading" or path in GENERATION_PATHS
        return "*" in self.paths or path in self.paths

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["paths"] = list(self.paths) if self.paths is not None else None
        return out


NO_FAULT = Fault()
# The fault the middleware took for this request, read by the generation (same task); set on every request.
MID_STREAM_FAULT: contextvars.ContextVar[Fault | None] = contextvars.ContextVar("fake_llama_fault", default=None)


class FaultSwitch:
    """The fault in force, how many more requests it applies to, and an epoch that a `hang` waits on."""

    def __init__(self) -> None:
        self.fault = NO_FAULT
        self.left: int | None = None
        self.epoch = 0

    def set(self, fault: Fault) -> None:
        """Put `fault` in force; any change releases requests held by `hang`."""
        self.fault = fault
        self.left = fault.count
        self.epoch += 1

    def take(self, path: str) -> Fault | None:
        """The fault for a request to `path`, if it applies (counting it down); None otherwise."""
        fault = self.fault
        if not fault.applies_to(path):
            return None
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                self.fault = NO_FAULT
                self.left = None
        return fault

    async def hold(self, request: web.BaseRequest) -> None:
        """Hang until the fault is changed (or the connection or server goes away)."""
        epoch = self.epoch
        while self.epoch == epoch:
            await asyncio.sleep(0.02)
            check_alive(request)


async def answer_early(switch: FaultSwitch, fault: Fault, request: web.BaseRequest) -> web.StreamResponse | None:
    """The answer in place of the handler, or None to run it. A `hang` that is not mid-stream holds here,
    then lets the request through unfaulted."""
    mode = fault.mode
    path = request.path
    if mode == "loading":
        return json_response(LOADING_BODY, 503)
    if mode == "error_500":
        err = api_error(fault.status, fault.message, "server_error")
        return json_response(err.body, err.status)
    if mode == "close_immediately" or (mode == "crash_mid_stream" and path not in GENERATION_PATHS):
        abort(request)
        return web.Response()
    if mode == "hang" and (fault.after_tokens is None or path not in GENERATION_PATHS):
        await switch.hold(request)
    return None


def mid_stream(fault: Fault | None, path: str) -> Fault | None:
    """What is left of `fault` for the generation once `answer_early` let the request through."""
    if fault is not None and fault.mode == "hang" and (fault.after_tokens is None or path not in GENERATION_PATHS):
        return None
    return fault


def fault_points(fault: Fault | None) -> tuple[int, int]:
    """The token index at which the connection is aborted, and the one at which it hangs (-1: never)."""
    crash_at = -1
    hang_at = -1
    if fault is not None:
        after = fault.after_tokens
        if fault.mode == "crash_mid_stream":
            crash_at = 2 if after is None else after
        elif fault.mode == "hang" and after is not None:
            hang_at = after
    return crash_at, hang_at
