"""The health poller survives whatever a backend answers: a failed probe, named, never a dead watch or start-up.

The hostile server here is not llama.cpp-shaped (the project's fake is): it answers garbage on cue.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from llmbalancer.fleet.backend import BackendState
from llmbalancer.fleet.probes import count, models_of
from tests.support import free_port, make_config, run_balancer, wait_for

DEEP = b"[" * 100_000 + b"]" * 100_000


@dataclass
class Hostile:
    """What each path answers: (status, body); a path not listed is 404."""

    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        status, body = self.answers.get(request.path, (404, b"Not Found"))
        return web.Response(status=status, body=body, content_type="application/json")


@contextlib.asynccontextmanager
async def hostile_backend(**answers: tuple[int, bytes]) -> AsyncIterator[Hostile]:
    hostile = Hostile({"/" + k.replace("_", "/"): v for k, v in answers.items()})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hostile.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hostile.url = f"http://127.0.0.1:{port}"
    try:
        yield hostile
    finally:
        await runner.cleanup()


def test_figures_outside_sane_bounds_are_not_believed() -> None:
    assert count(4) == 4 and count(4.0) == 4
    assert count(float("nan")) is None and count(float("inf")) is None and count(-1) is None
    assert count(True) is None and count("4") is None and count(10**9) is None and count(2.5) is None
    assert models_of({"data": [{"id": "x" * 10_000}, {"id": 3}, "junk", {"id": "ok"}]}) == ("ok",)
    assert models_of({"data": "not a list", "models": None}) == ()


async def test_a_backend_answering_100000_deep_json_at_start_up_is_a_failed_probe_not_a_dead_balancer() -> None:
    async with hostile_backend(health=(200, DEEP)) as hostile, run_balancer(make_config([hostile.url])) as balancer:
        backend = balancer.components.registry.backends[0]
        await wait_for(lambda: backend.state is BackendState.UNHEALTHY, timeout=10)
        assert "unreadable" in backend.state_reason and "nested" in backend.state_reason
        # The watch goes on: once the backend answers sensibly it is taken back.
        hostile.answers["/health"] = (200, b'{"status": "ok"}')
        hostile.answers["/slots"] = (200, b'[{"id": 0, "is_processing": false}]')
        await wait_for(lambda: backend.routable, timeout=10)
        assert backend.health.slots_total == 1


async def test_nan_metrics_never_kill_the_watch_a_later_500_still_takes_the_backend_out() -> None:
    async with hostile_backend(
        health=(200, b'{"status": "ok"}'),
        slots=(501, b'{"error": "slots disabled"}'),
        metrics=(200, b"llamacpp:requests_processing nan\nllamacpp:requests_deferred -3\n"),
        props=(200, b'{"total_slots": 1e300}'),
    ) as hostile, run_balancer(make_config([hostile.url, "http://127.0.0.1:9=spare"])) as balancer:
        backend = balancer.components.registry.get("127.0.0.1:" + hostile.url.rsplit(":", 1)[1])
        assert backend is not None
        await wait_for(lambda: backend.routable, timeout=10)
        assert backend.health.slots_busy is None and backend.health.deferred is None
        assert backend.health.slots_total is None  # 1e300 slots: not believed
        hostile.answers["/health"] = (500, b'{"error": "broken"}')
        await wait_for(lambda: backend.state is BackendState.UNHEALTHY, timeout=10)
        assert "HTTP 500" in backend.state_reason


async def test_an_endless_health_answer_is_cut_off_and_fails_the_probe() -> None:
    async with hostile_backend(health=(200, b" " * (9 * 1024 * 1024))) as hostile, run_balancer(
        make_config([hostile.url])
    ) as balancer:
        backend = balancer.components.registry.backends[0]
        await wait_for(lambda: backend.state is BackendState.UNHEALTHY, timeout=10)
        assert "unreadable" in backend.state_reason
