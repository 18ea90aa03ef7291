"""Run the app: bind, serve, and on SIGTERM/SIGINT drain in-flight requests before exiting.

The first signal stops accepting and lets in-flight streams finish for up to
``server.drain_timeout`` seconds, then cancels the rest and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal

import structlog
from aiohttp import web

from llmbalancer.app import COMPONENTS, build_app
from llmbalancer.config import Config, fleet_sources
from llmbalancer.observe.logs import flush_logs
from llmbalancer.relay.connection import app_runner
from llmbalancer.reloading import ConfigSource

log = structlog.get_logger("llmbalancer.server")

EXIT_ON_SECOND_SIGNAL = 130


async def serve(config: Config, source: ConfigSource | None = None) -> int:
    """Serve ``config``; ``source`` is what it was loaded from, which SIGHUP loads again (``reloading.py``)."""
    _raise_fd_limit()
    app = build_app(config, source)
    runner = app_runner(app, config.server, shutdown_timeout=config.server.drain_timeout)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            flush_logs()
            os._exit(EXIT_ON_SECOND_SIGNAL)
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    reloads: set[asyncio.Task[object]] = set()

    def on_hangup() -> None:
        reloader = app[COMPONENTS].reloader
        if reloader is not None and not stop.is_set():
            task = asyncio.create_task(reloader.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        # A burst of thousands of new streams must not overflow the accept queue (a dropped SYN costs a client 1 s
        # and more); the kernel caps this at net.core.somaxconn.
        tls = app[COMPONENTS].tls  # HTTPS: the same HTTP/1.1 over TLS, lean front and aiohttp alike
        site = web.TCPSite(
            runner, config.server.host, config.server.port, backlog=4096,
            ssl_context=tls.context if tls is not None else None,
        )
        await site.start()
        _settle_garbage_collector()
        registry = app[COMPONENTS].registry
        log.info(
            "listening",
            url=f"{'https' if tls is not None else 'http'}://{config.server.host}:{config.server.port}",
            policy=config.policy.name,
            backends=[b.name for b in registry],
            fleet_sources=fleet_sources(config),
        )
        if not fleet_sources(config):
            log.warning("no_backends", hint="every request gets 503: give --backend URL[=NAME], --backends-file FILE, "
                        "--commands FILE, --server-list FILE, or backends:/instances:/discovery.dns: in --config "
                        "FILE, or register backends while it runs (POST /admin/backends, llmbalancer agent)")
        await stop.wait()
        in_flight = sum(b.traffic.in_flight for b in registry)
        log.info("draining", in_flight=in_flight, timeout_s=config.server.drain_timeout)
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0


def _raise_fd_limit() -> None:
    """Each stream holds two sockets (the client's and the backend's): 10,000 streams need 20,000 descriptors,
    and many systems start a process with a soft limit of 1,024. Raise it to the hard limit, and say so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # the kernel's usual nr_open
    if soft == target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("fd_limit_not_raised", soft=soft, hard=hard, error=str(exc))
        return
    log.info("fd_limit_raised", soft_was=soft, soft=target, streams_at_most=(target - 64) // 2)


def _settle_garbage_collector() -> None:
    """Everything built at start-up (config, modules, the app) lives as long as the process: move it out
    of the collector's sight, so that each collection scans only what requests allocated. The default
    gen-0 threshold (700 allocations) runs a collection every few requests; a proxy's per-request
    objects are short-lived and mostly acyclic, so collecting less often costs little memory."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(_GEN0_THRESHOLD, second, third)


_GEN0_THRESHOLD = 10_000
