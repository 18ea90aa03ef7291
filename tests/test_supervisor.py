"""The supervisor with real (tiny Python) child processes, inside an in-process balancer."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from structlog.testing import capture_logs

from llmbalancer.config import Config
from llmbalancer.fleet.backend import BackendState
from llmbalancer.supervisor.instances import InstanceStatus, Supervisor
from llmbalancer.supervisor.output_log import OutputLog
from llmbalancer.web.admin import add_admin_routes, is_loopback
from tests.supervisor_support import (
    CRASHING_CHILD,
    HEALTHY_CHILD,
    child_command,
    process_gone,
    write_child,
)
from tests.support import free_port, get_json, make_config, run_balancer, wait_for

# A child that is slow to bind (so "starting" can be seen) and holds /slow requests for a while.
SLOW_CHILD = HEALTHY_CHILD.replace(
    "import http.server, sys", "import http.server, sys, time\ntime.sleep(0.5)"
).replace("    def do_GET(self):\n", "    def do_GET(self):\n        if self.path == '/slow': time.sleep(1.0)\n")


def _config(tmp_path: Path, lines: list[str], **overrides: Any) -> Config:
    commands = tmp_path / "commands.txt"
    commands.write_text("\n".join(lines) + "\n")
    values: dict[str, Any] = {
        "supervisor.commands_file": str(commands),
        "supervisor.output_dir": str(tmp_path / "outputs"),
        "supervisor.stop_grace": 2.0,
        "supervisor.drain_timeout": 5.0,
        "supervisor.restart_backoff": 0.05,
    }
    values.update(overrides)
    return make_config([], **values)


def _supervisor(balancer: Any) -> Supervisor:
    supervisor = balancer.components.supervisor
    assert supervisor is not None
    return supervisor


async def test_instance_is_starting_until_its_health_says_ready_then_routable_with_its_output_logged(
    tmp_path: Path,
) -> None:
    script = write_child(tmp_path, "slow.py", SLOW_CHILD)
    port = free_port()
    config = _config(tmp_path, [child_command(script, port)])
    with capture_logs() as logs:
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            instance = _supervisor(balancer).instances[f"{Path(sys.executable).name}-{port}"]
            await wait_for(lambda: instance.alive)
            # Alive and not yet listening: starting (connections refused do not make it unhealthy).
            assert instance.backend.state is BackendState.STARTING and not instance.backend.routable
            # A request sent now is refused or waits in the admission queue: never sent to it before it is ready.
            async with session.get(balancer.url + "/anything") as early:
                assert early.status in (200, 503)
            await wait_for(lambda: instance.backend.routable, timeout=10)
            assert await get_json(session, balancer.url + "/anything") == {"status": "ok"}
            assert instance.status is InstanceStatus.RUNNING
    events = [e for e in logs if e["event"] == "instance_ready" or e.get("backend") == instance.name]
    ready = next(i for i, e in enumerate(events) if e["event"] == "instance_ready")
    assert all(i > ready for i, e in enumerate(events) if e["event"] == "request")
    assert [e["new"] for e in logs if e["event"] == "backend_state_changed"][:1] == ["healthy"]
    log_text = instance.output.path.read_text()
    assert "===== llmbalancer" in log_text and f"child serving on {port}" in log_text


async def test_crash_looping_command_ends_failed_with_its_log_tail_reported(tmp_path: Path) -> None:
    script = write_child(tmp_path, "crash.py", CRASHING_CHILD)
    config = _config(tmp_path, [child_command(script, free_port())], **{"supervisor.max_restarts": 2})
    with capture_logs() as logs:
        async with run_balancer(config) as balancer:
            (instance,) = _supervisor(balancer).instances.values()
            await wait_for(lambda: instance.status is InstanceStatus.FAILED, timeout=10)
            assert balancer.components.registry.get(instance.name) is instance.backend
            assert instance.backend.state is BackendState.FAILED
            assert "crashed 3 times" in instance.backend.state_reason
    (failed,) = [e for e in logs if e["event"] == "instance_failed"]
    assert failed["log_level"] == "error"
    assert any("fatal: cannot load model (simulated)" in line for line in failed["log_tail"])
    assert instance.restarts == 2
    assert instance.output.path.read_text().count("===== llmbalancer") >= 3 * 2  # a start and an exit each


async def test_missing_binary_is_reported_with_its_path_while_the_other_instance_serves(tmp_path: Path) -> None:
    script = write_child(tmp_path, "ok.py", HEALTHY_CHILD)
    missing = tmp_path / "no-such-dir" / "llamafile"
    config = _config(tmp_path, [f"{missing} --port {free_port()} -a ghost", child_command(script, free_port())])
    with capture_logs() as logs:
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            ghost = _supervisor(balancer).instances["ghost"]
            await wait_for(lambda: ghost.status is InstanceStatus.FAILED)
            assert ghost.backend.state is BackendState.FAILED and str(missing) in ghost.backend.state_reason
            await wait_for(lambda: bool(balancer.components.registry.routable()), timeout=10)
            for _ in range(3):
                assert await get_json(session, balancer.url + "/props") == {"status": "ok"}
    (error,) = [e for e in logs if e["event"] == "instance_cannot_start"]
    assert error["path"] == str(missing) and error["log_level"] == "error"
    assert "No such file" in error["error"]


async def test_a_port_held_by_another_process_is_never_routed_to_and_the_instance_waits_for_it(
    tmp_path: Path,
) -> None:
    script = write_child(tmp_path, "ok.py", HEALTHY_CHILD)
    port = free_port()
    # Another process's server on the instance's port, answering /health as a llama-server would.
    async def answer(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "who": "squatter"})

    squatter = web.Application()
    squatter.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(squatter)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = _config(tmp_path, [child_command(script, port)], **{"supervisor.stop_grace": 3.0})
    try:
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            instance = _supervisor(balancer).instances[f"{Path(sys.executable).name}-{port}"]
            await wait_for(lambda: instance.status is InstanceStatus.FAILED, timeout=5)
            assert "in use by another process" in instance.reason and not instance.alive
            await asyncio.sleep(0.5)  # a few health polls find the squatter answering: it stays out
            assert instance.backend.state is BackendState.FAILED
            async with session.get(balancer.url + "/health-of-anyone") as reply:
                assert reply.status == 503
            await runner.cleanup()  # the port is let go within the wait: the instance starts after all
            await wait_for(lambda: instance.backend.routable, timeout=10)
            assert await get_json(session, balancer.url + "/anything") == {"status": "ok"}
    finally:
        await runner.cleanup()


async def test_a_port_that_stays_taken_leaves_the_instance_failed_with_the_reason(tmp_path: Path) -> None:
    script = write_child(tmp_path, "ok.py", HEALTHY_CHILD)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = _config(tmp_path, [child_command(script, port)], **{"supervisor.stop_grace": 0.5})
        with capture_logs() as logs:
            async with run_balancer(config) as balancer:
                instance = _supervisor(balancer).instances[f"{Path(sys.executable).name}-{port}"]
                await wait_for(lambda: "not started" in instance.reason, timeout=5)
                assert instance.status is InstanceStatus.FAILED and instance.process is None
    (error,) = [e for e in logs if e["event"] == "instance_not_started"]
    assert f"port {port} is in use" in error["reason"]


async def test_admin_stop_drains_in_flight_requests_first_and_start_and_restart_bring_it_back(
    tmp_path: Path,
) -> None:
    script = write_child(tmp_path, "slow.py", SLOW_CHILD)
    port = free_port()
    config = _config(tmp_path, [child_command(script, port) + " -a slowpoke"])
    async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
        instance = _supervisor(balancer).instances["slowpoke"]
        await wait_for(lambda: instance.backend.routable, timeout=10)
        listed = await get_json(session, balancer.url + "/admin/instances")
        (entry,) = listed["instances"]
        assert entry["name"] == "slowpoke" and entry["state"] == "running" and entry["restarts"] == 0
        assert entry["pid"] == instance.process.pid if instance.process else False
        assert entry["log_path"].endswith("slowpoke.log") and entry["uptime_s"] >= 0
        first_pid = entry["pid"]

        slow = asyncio.ensure_future(session.get(balancer.url + "/slow"))
        await wait_for(lambda: instance.backend.traffic.in_flight == 1)
        async with session.post(balancer.url + "/admin/instances/slowpoke/stop") as reply:
            assert reply.status == 200
            assert (await reply.json())["instance"]["state"] == "stopped"
        async with await slow as slow_reply:  # it finished before the stop went ahead
            assert slow_reply.status == 200
        assert process_gone(first_pid)
        assert balancer.components.registry.get("slowpoke") is None

        async with session.post(balancer.url + "/admin/instances/slowpoke/start") as reply:
            assert reply.status == 200
        await wait_for(lambda: instance.backend.routable, timeout=10)
        second_pid = instance.process.pid if instance.process else 0
        async with session.post(balancer.url + "/admin/instances/slowpoke/restart") as reply:
            assert reply.status == 200
        await wait_for(lambda: instance.backend.routable, timeout=10)
        assert instance.process is not None and instance.process.pid != second_pid and process_gone(second_pid)

        async with session.post(balancer.url + "/admin/instances/nobody/stop") as reply:
            assert reply.status == 404
            assert (await reply.json())["error"]["code"] == "not_found"


async def test_admin_routes_answer_loopback_clients_only() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.5") and not is_loopback(None) and not is_loopback("garbage")

    from aiohttp import web

    from llmbalancer.app import build_components

    app = web.Application()
    add_admin_routes(app, build_components(make_config([])))
    app.freeze()

    class Transport:
        def __init__(self, peer: str) -> None:
            self.peer = peer

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return (self.peer, 40000) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    for peer, status in (("10.0.0.5", 403), ("127.0.0.1", 200)):
        request = make_mocked_request("GET", "/admin/instances", app=app, transport=Transport(peer))
        match = await app.router.resolve(request)
        request._match_info = match  # routing a mocked request by hand
        response = await match.handler(request)
        assert response.status == status
        if status == 403:
            assert b'"code": "forbidden"' in response.body  # type: ignore[operator]


def test_output_log_rotates_by_size_and_keeps_the_last_lines(tmp_path: Path) -> None:
    output = OutputLog(tmp_path / "x.log", max_bytes=1024, backups=2)
    output.mark("starting x")
    for index in range(100):
        output.write(f"line {index:03d} {'.' * 40}\n".encode())
    output.close()
    assert (tmp_path / "x.log").stat().st_size <= 1024
    assert (tmp_path / "x.log.1").exists() and (tmp_path / "x.log.2").exists()
    assert not (tmp_path / "x.log.3").exists()
    assert output.tail(2)[-1].startswith("line 099")
