"""The registry's three operations every fleet source ends in: add, update, remove (drain, then forget)."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from llmbalancer.fleet.backend import Backend, BackendSpec, BackendState, Health
from llmbalancer.fleet.registry import Registry
from tests.support import occupy


def _backend(name: str, source: str = "api") -> Backend:
    return Backend(name, f"http://127.0.0.1:1/{name}", source=source)


async def test_a_new_backend_is_starting_and_takes_no_traffic_until_it_is_said_ready() -> None:
    registry = Registry()
    added: list[str] = []
    registry.on_added.append(lambda b: added.append(b.name))
    with capture_logs() as logs:
        backend = registry.add(_backend("a"))
    assert backend.state is BackendState.STARTING and not backend.routable
    assert added == ["a"]
    assert [(e["event"], e["source"]) for e in logs] == [("backend_added", "api")]


async def test_removing_an_idle_backend_forgets_it_at_once_and_everyone_who_remembers_it() -> None:
    registry = Registry()
    registry.add(_backend("a"))
    forgotten: list[str] = []
    registry.on_removed.append(lambda b: forgotten.append(b.name))
    version = registry.models_version
    with capture_logs() as logs:
        registry.remove("a")
    assert registry.get("a") is None and forgotten == ["a"]
    assert registry.models_version > version
    assert [e["event"] for e in logs] == ["backend_state_changed", "backend_removed"]
    assert registry.remove("a") is None  # unknown: nothing happens


async def test_a_removed_backend_drains_its_in_flight_requests_then_leaves() -> None:
    registry = Registry()
    a = registry.add(_backend("a"))
    registry.set_state(a, BackendState.HEALTHY)
    claim = occupy(registry, a)
    registry.remove("a")
    assert a.state is BackendState.DRAINING and not a.routable
    assert registry.get("a") is a and registry.leaving("a")
    registry.remove("a")  # removing again changes nothing
    claim.release()
    assert registry.get("a") is None and not registry.leaving("a")


async def test_a_drain_that_outlasts_drain_timeout_forgets_the_backend_anyway() -> None:
    registry = Registry(drain_timeout=0.1)
    a = registry.add(_backend("a"))
    claim = occupy(registry, a)
    with capture_logs() as logs:
        registry.remove("a")
        await asyncio.sleep(0.3)
    assert registry.get("a") is None
    assert "backend_drain_timeout" in [e["event"] for e in logs]
    claim.release()  # the request that outlived the drain releases a slot nobody counts any more


async def test_an_update_to_another_url_is_another_server_starting_afresh() -> None:
    registry = Registry()
    a = registry.add(_backend("a"))
    registry.set_state(a, BackendState.HEALTHY)
    a.health = Health(slots_total=4, served_models=("m",))
    version = registry.models_version
    assert registry.update("a", BackendSpec("a", a.url, max_concurrency=None)) == []
    changed = registry.update("a", BackendSpec("a", "http://127.0.0.1:2", models=("x",)))
    assert changed == ["url", "models"]
    assert a.url == "http://127.0.0.1:2" and a.models == ("x",)
    assert a.state is BackendState.STARTING and a.health == Health()
    assert registry.models_version > version


async def test_registering_a_draining_backend_again_takes_it_back() -> None:
    registry = Registry()
    a = registry.add(_backend("a"))
    claim = occupy(registry, a)
    registry.remove("a")
    assert registry.update("a", a.spec) == ["revived"]
    assert a.state is BackendState.STARTING and not registry.leaving("a")
    claim.release()
    assert registry.get("a") is a
