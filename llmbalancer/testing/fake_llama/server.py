"""`FakeLlama`: one fake server's lifecycle (start, stop like a crash, restart on the same port), its
Python control API, and the aiohttp app around the endpoints: the middleware that records each request,
answers 503 while loading and applies faults, and the headers of cpp-httplib (`Server: llama.cpp`,
`Keep-Alive: timeout=5, max=100`, `Connection: close` on a connection's last request).
Also `run_fake_llama` / `run_fake_fleet` to serve fakes for the duration of a block.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

from aiohttp import web

from llmbalancer.testing.fake_llama.config import FakeLlamaConfig
from llmbalancer.testing.fake_llama.control import CONTROL_PREFIX, ControlApi
from llmbalancer.testing.fake_llama.endpoints import LLAMA_ONLY_PATHS, LlamaApi
from llmbalancer.testing.fake_llama.faults import MID_STREAM_FAULT, NO_FAULT, Fault, FaultMode, answer_early, mid_stream
from llmbalancer.testing.fake_llama.state import ServerState
from llmbalancer.testing.fake_llama.stats import RequestRecord
from llmbalancer.testing.fake_llama.wire import LOADING_BODY, NOT_FOUND_BODY, ApiError, json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _answer(handler: Handler, request: web.Request) -> web.StreamResponse:
    try:
        return cast(web.StreamResponse, await handler(request))
    except ApiError as exc:
        return json_response(exc.body, exc.status)


class FakeLlama:
    """One fake llama-server. `await start()` / `await stop()` (restartable on the same port)."""

    def __init__(self, config: FakeLlamaConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = ServerState(config or FakeLlamaConfig())
        self.llama_api = LlamaApi(self.state)
        self.control = ControlApi(self.state)
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    # --- lifecycle

    @property
    def config(self) -> FakeLlamaConfig:
        return self.state.config

    @property
    def port(self) -> int:
        """The bound port (after the first start when it was created with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self.state.running

    def make_app(self) -> web.Application:
        """The aiohttp app of this fake (also usable with aiohttp's own test server)."""
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        app.on_response_prepare.append(self._on_prepare)
        self.llama_api.add_routes(app.router)
        self.control.add_routes(app.router)
        app.router.add_route("*", "/{tail:.*}", self.llama_api.not_found)
        return app

    async def start(self) -> None:
        """Start serving (again): a fresh "process" with empty slots, caches and metrics, loading first."""
        if self._runner is not None:
            return
        config = self.config
        self.state.restart_engine()
        runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=config.keepalive_timeout,
            shutdown_timeout=0.05,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner
        self.state.running = True

    async def stop(self) -> None:
        """Stop like a crashed process: close the listener, abort every connection (mid-stream too)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.state.running = False
        for site in list(runner.sites):
            await site.stop()
        # A connection accepted just before the listener closed is handed to its protocol a few loop
        # turns later; wait for it so it is aborted too instead of lingering as an unclosed socket.
        for _ in range(3):
            await asyncio.sleep(0.005)
            server = runner.server
            if server is not None:
                for conn in server.connections:
                    if conn.transport is not None:
                        conn.transport.abort()
        await runner.cleanup()

    async def __aenter__(self) -> FakeLlama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- control from Python

    def set_fault(
        self,
        mode: FaultMode | Fault = "none",
        *,
        after_tokens: int | None = None,
        count: int | None = None,
        status: int = 500,
        message: str | None = None,
        paths: Iterable[str] | None = None,
    ) -> Fault:
        """Inject a fault (or pass a ready `Fault`); any change releases requests held by `hang`."""
        if isinstance(mode, Fault):
            return self.state.set_fault(mode)
        fault = Fault(
            mode=mode,
            after_tokens=after_tokens,
            count=count,
            status=status,
            message=message if message is not None else Fault.message,
            paths=tuple(paths) if paths is not None else None,
        )
        return self.state.set_fault(fault)

    def clear_fault(self) -> None:
        self.state.set_fault(NO_FAULT)

    @property
    def fault(self) -> Fault:
        return self.state.faults.fault

    def update_config(self, **changes: Any) -> FakeLlamaConfig:
        """Change `RUNTIME_FIELDS` (delays, reply, alias, ...) while serving; `load_time` applies at the
        next start, a request already running keeps the timing it started with."""
        return self.state.update_config(**changes)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for tests (also `GET /_fake/stats`). Header names in the records are lower-case."""
        return self.state.snapshot()

    def reset_stats(self) -> None:
        """Zero the test counters (the server's own metrics are not touched)."""
        self.state.stats.reset()

    # --- plumbing

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers["Server"] = "llama.cpp"
        count = getattr(request.protocol, "_request_count", 0)
        if count >= self.config.keepalive_max:
            response.force_close()
            headers["Connection"] = "close"  # aiohttp may have chosen its headers already
        elif request.keep_alive and response.keep_alive is not False:
            timeout = self.config.keepalive_timeout
            headers["Keep-Alive"] = f"timeout={timeout:g}, max={self.config.keepalive_max}"

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(CONTROL_PREFIX):
            return await _answer(handler, request)
        body = await request.read() if request.body_exists else b""
        state = self.state
        state.stats.record(RequestRecord(request.method, path, request.query_string, request.headers, body))
        if state.config.plain_openai and path in LLAMA_ONLY_PATHS:
            return json_response(NOT_FOUND_BODY, 404)
        if state.config.plain_openai and path == "/health":
            return web.Response(status=200)  # vLLM: ready, and nothing else said
        if time.monotonic() < state.engine.ready_at:
            return json_response(LOADING_BODY, 503)
        fault = state.take_fault(path) if state.faults.fault is not NO_FAULT else None
        if fault is not None:
            early = await answer_early(state.faults, fault, request)
            if early is not None:
                return early
        MID_STREAM_FAULT.set(mid_stream(fault, path))  # read by the generation (same task), set on every request
        return await _answer(handler, request)


@contextlib.asynccontextmanager
async def run_fake_llama(
    config: FakeLlamaConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FakeLlama]:
    """Serve one fake on `host` (a free port unless given) for the duration of the block."""
    fake = FakeLlama(config, host=host, port=port)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@contextlib.asynccontextmanager
async def run_fake_fleet(
    n: int, config: FakeLlamaConfig | Sequence[FakeLlamaConfig] | None = None, *, host: str = "127.0.0.1"
) -> AsyncIterator[list[FakeLlama]]:
    """Serve `n` fakes on free ports (one config for all, or one per server)."""
    configs = list(config) if isinstance(config, Sequence) else [config or FakeLlamaConfig()] * n
    if len(configs) != n:
        raise ValueError("give one config, or exactly n of them")
    async with contextlib.AsyncExitStack() as stack:
        fakes = [await stack.enter_async_context(run_fake_llama(c, host=host)) for c in configs]
        yield fakes
