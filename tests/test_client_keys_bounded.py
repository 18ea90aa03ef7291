"""What a client sends is kept by the scheduler, if at all, in bounded form: session keys as fixed-size
digests in capped tables, no cache keyed by a megabyte-long model name, no queue left for a model nobody waits for."""

from __future__ import annotations

from typing import Any

from llmbalancer.config import RoutingConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.admission import AdmissionQueue
from llmbalancer.scheduling.model_routing import ModelRouter
from llmbalancer.scheduling.selectors.base import RequestFacts
from llmbalancer.scheduling.selectors.hash import Hash
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from llmbalancer.scheduling.selectors.sticky import Sticky

MIB = 1024 * 1024


def _backend(name: str, models: tuple[str, ...] = (), served: tuple[str, ...] = ()) -> Backend:
    made = Backend(name=name, url=f"http://{name}", models=models, state=BackendState.HEALTHY)
    made.health.served_models, made.health.slots_total = served, 2
    return made


def _facts(body: dict[str, Any], headers: dict[str, str] | None = None) -> RequestFacts:
    return RequestFacts("POST", "/v1/chat/completions", "10.0.0.1", headers or {}, body.get("model"), body)


def test_sticky_pins_sessions_by_a_fixed_size_digest_never_the_clients_string() -> None:
    sticky = Sticky(SlotAware())
    a = _backend("a")
    huge = _facts({"model": "m", "user": "u" * MIB})
    sticky.claimed(a, huge)
    assert [len(key) for key in sticky._pins] == [16]
    assert sticky.pinned(_facts({"model": "m", "user": "u" * MIB})) == "a"  # the same session, found again
    assert sticky.pinned(_facts({"model": "m", "user": "u" * (MIB - 1)})) is None


def test_sticky_pins_are_capped_dropping_the_least_recently_used() -> None:
    sticky = Sticky(SlotAware(), max_sessions=3)
    a = _backend("a")
    sessions = [_facts({"model": "m"}, {"X-Session-ID": f"s{i}"}) for i in range(5)]
    for session in sessions[:3]:
        sticky.claimed(a, session)
    sticky.claimed(a, sessions[0])  # used again: now the most recent
    for session in sessions[3:]:
        sticky.claimed(a, session)
    assert sticky.entries_count() == 3
    assert [sticky.pinned(s) for s in sessions] == ["a", None, None, "a", "a"]


def test_sticky_and_hash_take_session_headers_that_are_not_utf8() -> None:
    # aiohttp decodes such header bytes as lone surrogates, which str.encode() refuses.
    header = b"caf\xe9".decode("utf-8", "surrogateescape")
    request = _facts({"model": "m"}, {"X-Session-ID": header, "X-User": header})
    a, b = _backend("a"), _backend("b")
    sticky = Sticky(SlotAware())
    sticky.claimed(a, request)
    assert sticky.pinned(request) == "a"
    assert Hash("header:X-User").select([a, b], request) in (a, b)


def test_model_routing_caches_no_megabyte_model_name() -> None:
    registry = Registry()
    registry.add(_backend("a", served=("smollm2",)))
    router = ModelRouter(RoutingConfig(strict_models=True))  # else this one-model fleet answers any name
    assert router.allowed("z" * MIB, registry) == frozenset()
    assert router.allowed("smollm2", registry) == frozenset(registry)
    assert [len(model) for model in router._allowed] == [len("smollm2")]


def test_a_models_admission_queue_is_removed_once_empty() -> None:
    admission = AdmissionQueue(max_size=4, timeout=1.0)
    for index in range(100):
        with admission.waiting(f"random-{index}-" + "x" * 1000, priority=0):
            pass
    assert admission._queues == {}
