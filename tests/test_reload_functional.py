"""Config reload on real sockets: POST /admin/reload and SIGHUP load the file again with the environment and
flags on top; an invalid file changes nothing; a valid one is applied as a diff, never cutting a stream."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from llmbalancer.reloading import ConfigSource
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet
from tests.supervisor_support import HEALTHY_CHILD, write_child
from tests.support import balancer_process, free_port, get_json, run_balancer, wait_for

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FLAGS = {"logging.format": "json", "health.interval": 0.2}


def _write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


async def _reload(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.post(url + "/admin/reload") as reply:
        return reply.status, await reply.json()


async def test_a_reload_with_an_invalid_file_changes_nothing_and_returns_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "llmbalancer.yaml"
    async with run_fake_fleet(2) as fakes:
        _write(path, {"backends": [f"{fakes[0].url}=a"], "queue": {"timeout": 7}})
        source = ConfigSource(config_file=str(path), environ={}, overrides=FLAGS)
        async with run_balancer(source.load(), source) as balancer, aiohttp.ClientSession() as session:
            components = balancer.components
            before = components.config
            path.write_text(
                f"backends: [{fakes[0].url}=a, {fakes[1].url}=b]\n"
                "queue:\n  timeout: soon\n"
                "policy:\n  name: fastest\n"
                "colour: red\n"
            )
            status, answer = await _reload(session, balancer.url)
            assert status == 400 and answer["reloaded"] is False
            assert answer["error"]["code"] == "invalid_config"
            problems = "\n".join(answer["problems"])
            assert "queue.timeout (line 3)" in problems and "colour (line 6)" in problems
            assert "unknown policy 'fastest'" in problems
            assert components.config is before
            assert [b.name for b in components.registry] == ["a"]  # b was not added
            assert components.dispatcher.admission.timeout == 7
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200  # the old configuration keeps serving


async def test_a_reload_that_removes_a_backend_and_adds_another_while_20_streams_run_completes_every_stream(
    tmp_path: Path,
) -> None:
    path = tmp_path / "llmbalancer.yaml"
    slow = FakeLlamaConfig(slots=10, token_delay=0.03, max_tokens_default=40)
    async with run_fake_fleet(3, slow) as (a, b, c):
        _write(path, {"backends": [f"{a.url}=a", f"{b.url}=b"], "policy": {"name": "least_connections"}})
        source = ConfigSource(config_file=str(path), environ={}, overrides=FLAGS)
        async with run_balancer(source.load(), source) as balancer, aiohttp.ClientSession() as session:
            registry = balancer.components.registry
            await wait_for(lambda: all(x.routable for x in registry), timeout=5)

            async def stream() -> bytes:
                body = {**CHAT, "stream": True, "max_tokens": 40, "ignore_eos": True}
                async with session.post(balancer.url + "/v1/chat/completions", json=body) as reply:
                    assert reply.status == 200
                    return await reply.read()

            streams = [asyncio.create_task(stream()) for _ in range(20)]
            await wait_for(lambda: sum(x.traffic.in_flight for x in registry) == 20, timeout=5)
            assert registry.get("a").traffic.in_flight > 0  # type: ignore[union-attr]
            _write(path, {"backends": [f"{b.url}=b", f"{c.url}=c"], "policy": {"name": "round_robin"},
                          "retries": {"attempts": 2}, "server": {"port": 1}})
            status, answer = await _reload(session, balancer.url)
            assert status == 200 and answer["reloaded"] is True
            assert {(x["action"], x["backend"]) for x in answer["changes"]} == {("added", "c"), ("removed", "a")}
            assert {"policy.name", "retries.attempts", "server.port"} <= set(answer["changed"])
            assert answer["needs_restart"] == ["server.port"]
            assert registry.get("a").state.value == "draining"  # type: ignore[union-attr]

            bodies = await asyncio.wait_for(asyncio.gather(*streams), 30)
            assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)
            assert all(body.count(b"data: {") >= 40 for body in bodies)
            await wait_for(lambda: registry.get("a") is None, timeout=5)
            await wait_for(lambda: (x := registry.get("c")) is not None and x.routable, timeout=5)
            for _ in range(4):
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                    assert reply.status == 200
            assert balancer.components.dispatcher.selector.name == "round_robin"
            assert c.state.stats.requests.get("/v1/chat/completions", 0) == 2  # round robin over b and c
            assert balancer.components.config.retries.attempts == 2


async def test_a_reload_restarts_only_the_instances_whose_own_settings_changed(tmp_path: Path) -> None:
    script = write_child(tmp_path, "child.py", HEALTHY_CHILD)
    ports = [free_port() for _ in range(3)]

    def instance(name: str, port: int, **extra: Any) -> dict[str, Any]:
        return {"name": name, "command": [sys.executable, str(script), "--port", str(port)], **extra}

    path = tmp_path / "llmbalancer.yaml"
    supervisor = {"output_dir": str(tmp_path / "out"), "stop_grace": 2.0, "drain_timeout": 2.0}
    _write(path, {"instances": [instance("x", ports[0]), instance("y", ports[1])], "supervisor": supervisor})
    source = ConfigSource(config_file=str(path), environ={}, overrides=FLAGS)
    async with run_balancer(source.load(), source) as balancer, aiohttp.ClientSession() as session:
        instances = balancer.components.supervisor.instances  # type: ignore[union-attr]
        await wait_for(lambda: all(i.backend.routable for i in instances.values()), timeout=10)
        pid_x = instances["x"].process.pid  # type: ignore[union-attr]
        pid_y = instances["y"].process.pid  # type: ignore[union-attr]
        _write(path, {
            "instances": [instance("x", ports[0]), instance("y", ports[1], env={"CHANGED": "1"}),
                          instance("z", ports[2])],
            "supervisor": supervisor,
        })
        status, answer = await _reload(session, balancer.url)
        assert status == 200
        assert sorted((x["action"], x["instance"]) for x in answer["changes"]) == [("restarted", "y"), ("started", "z")]
        await wait_for(lambda: set(instances) == {"x", "y", "z"} and all(
            i.backend.routable and i.process is not None and i.process.pid != pid_y for n, i in instances.items()
            if n != "x"), timeout=15)
        assert instances["x"].process.pid == pid_x  # type: ignore[union-attr]

        _write(path, {"instances": [instance("y", ports[1], env={"CHANGED": "1"}), instance("z", ports[2])],
                      "supervisor": supervisor})
        status, answer = await _reload(session, balancer.url)
        assert [(x["action"], x["instance"]) for x in answer["changes"]] == [("stopped", "x")]
        registry = balancer.components.registry
        await wait_for(lambda: registry.get("x") is None and "x" not in instances, timeout=10)
        listed = await get_json(session, balancer.url + "/admin/instances")
        assert sorted(i["name"] for i in listed["instances"]) == ["y", "z"]


async def test_sighup_reloads_the_file_with_the_original_flags_on_top(tmp_path: Path) -> None:
    path = tmp_path / "llmbalancer.yaml"
    port = free_port()
    async with run_fake_fleet(2) as fakes:
        _write(path, {"backends": [f"{fakes[0].url}=a"], "server": {"port": 1}})
        # The flag beats the file (port 1), at start-up and at every reload.
        child = balancer_process(["serve", "--config", str(path), "--port", str(port), "--log-format", "json"])
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                await wait_for(lambda: child.poll() is not None or _answers(url), timeout=20, interval=0.1)
                assert child.poll() is None
                _write(path, {"backends": [f"{fakes[0].url}=a", f"{fakes[1].url}=b"], "server": {"port": 1}})
                child.send_signal(signal.SIGHUP)

                async def names() -> set[str]:
                    return {b["name"] for b in (await get_json(session, url + "/admin/backends"))["backends"]}

                for _ in range(100):
                    if await names() == {"a", "b"}:
                        break
                    await asyncio.sleep(0.05)
                assert await names() == {"a", "b"}
                status, answer = await _reload(session, url)
                assert status == 200 and answer["needs_restart"] == []  # the flag still sets the port
        finally:
            child.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(child.wait, 15) == 0
            if child.stdout:
                child.stdout.close()


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/admin/backends", timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False
