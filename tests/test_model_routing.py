"""Model routing decisions, without sockets: eligibility, instance aliases, routes, fallback, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmbalancer.config import ConfigError, ModelRoute, RoutingConfig
from llmbalancer.configure import load_config
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.registry import Registry
from llmbalancer.relay.inbound import InboundBody, with_model
from llmbalancer.scheduling.model_routing import ModelRouter, client_names, instances
from llmbalancer.scheduling.selectors import RequestFacts


def _registry(**models: tuple[str, ...]) -> Registry:
    registry = Registry()
    for name, served in models.items():
        registry.add(Backend(name=name, url=f"http://{name}", models=served))
    return registry


def _names(backends: list[Backend]) -> list[str]:
    return [b.name for b in backends]


def _facts(model: str, path: str = "/v1/chat/completions") -> RequestFacts:
    return RequestFacts("POST", path, "127.0.0.1", model=model, body={"model": model})


def test_instances_are_the_model_and_its_numbered_copies_model_first() -> None:
    assert instances("smol", ["smol-3", "other", "smol", "smol-2", "smol-x", "smolx-2"]) == ["smol", "smol-2", "smol-3"]
    assert instances("llama3", ["llama3:latest"]) == ["llama3:latest"]  # Ollama's implicit tag
    assert instances("llama3:latest", ["llama3"]) == ["llama3"]


def test_clients_see_each_model_once_with_numbered_aliases_hidden_only_where_the_base_is_served() -> None:
    assert client_names(["smol", "smol-2", "beta", "smol", "llama-3"]) == ["smol", "beta", "llama-3"]


def test_a_model_goes_only_to_the_backends_that_serve_it() -> None:
    registry = _registry(a=("alpha",), b=("beta",), c=("alpha-2",))
    router = ModelRouter()
    assert _names(router.eligible("alpha", registry)) == ["a", "c"]
    assert _names(router.eligible("beta", registry)) == ["b"]


def test_backends_without_a_models_list_take_any_model_so_fleets_without_model_info_keep_working() -> None:
    registry = _registry(a=(), b=())
    assert _names(ModelRouter().eligible("whatever", registry)) == ["a", "b"]
    # ...but a backend known to serve the model is preferred over an open one.
    registry.add(Backend(name="c", url="http://c", models=("whatever",)))
    assert _names(ModelRouter().eligible("whatever", registry)) == ["c"]


def test_first_full_match_route_wins_and_the_fallback_takes_what_no_route_matches() -> None:
    registry = _registry(a=(), b=(), c=())
    routing = RoutingConfig(
        models=(ModelRoute("gpt-oss:20b-128k.*", ("a",)), ModelRoute("gpt-oss:20b.*", ("a", "b"))), fallback="c"
    )
    router = ModelRouter(routing)
    assert _names(router.eligible("gpt-oss:20b-128k", registry)) == ["a"]
    assert _names(router.eligible("gpt-oss:20b-64k", registry)) == ["a", "b"]
    assert _names(router.eligible("x-gpt-oss:20b", registry)) == ["c"]  # full match, not search
    assert _names(router.eligible("mistral", registry)) == ["c"]


def test_a_route_is_narrowed_to_its_backends_that_serve_the_model() -> None:
    registry = _registry(a=("qwen",), b=("llama",))
    router = ModelRouter(RoutingConfig(models=(ModelRoute(".*", ("a", "b")),)))
    assert _names(router.eligible("llama", registry)) == ["b"]
    assert _names(router.eligible("mystery", registry)) == ["a", "b"]  # none known: the route decides


def test_unknown_model_is_a_404_listing_what_is_served() -> None:
    registry = _registry(a=("alpha", "alpha-2"), b=("beta",))
    with pytest.raises(ProxyError) as caught:
        ModelRouter().exclusion(_facts("gamma"), registry, ())
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert "alpha, beta" in caught.value.message and "alpha-2" not in caught.value.message


def test_exclusion_keeps_out_backends_of_other_models_and_applies_only_to_model_routes() -> None:
    registry = _registry(a=("alpha",), b=("beta",))
    a, b = registry.backends
    excluded = ModelRouter().exclusion(_facts("alpha"), registry, ())
    assert b in excluded and a not in excluded
    assert list(excluded) == [b]
    untouched: tuple[Backend, ...] = ()
    assert ModelRouter().exclusion(_facts("gamma", "/tokenize"), registry, untouched) is untouched


def test_body_is_rewritten_to_the_backends_own_instance_name_and_left_alone_otherwise() -> None:
    registry = _registry(a=("smol",), b=("smol-2",))
    a, b = registry.backends
    body = InboundBody(b'{"model": "smol", "stream": true}', None, {"model": "smol", "stream": True})
    router = ModelRouter()
    facts = _facts("smol")
    assert with_model(body, router.rename_for(facts, a)) is body
    sent = with_model(body, router.rename_for(facts, b))
    assert sent.data is not None and json.loads(sent.data) == {"model": "smol-2", "stream": True}


def test_several_instances_on_one_backend_take_turns() -> None:
    backend = Backend(name="a", url="http://a", models=("smol", "smol-2"))
    router = ModelRouter()
    assert [router.instance_for("smol", backend) for _ in range(4)] == ["smol", "smol-2", "smol", "smol-2"]


def test_routes_in_yaml_keep_their_order_and_bad_ones_are_named(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "backends:\n  - {url: 'http://127.0.0.1:1', name: a, models: [alpha]}\n  - http://127.0.0.1:2=b\n"
        "routing:\n  models:\n    'z.*': [b]\n    'a.*': [a, b]\n  fallback: b\n"
    )
    config = load_config(config_file=str(path), environ={})
    assert [r.pattern for r in config.routing.models] == ["z.*", "a.*"]
    assert config.routing.models[1].backends == ("a", "b")
    assert config.routing.fallback == "b"
    assert config.backends[0].models == ("alpha",)

    path.write_text("backends: [http://127.0.0.1:1=a]\nrouting:\n  models: {'(': [a], 'x': [nobody]}\n  fallback: c\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=str(path), environ={})
    keys = {p.key for p in caught.value.problems}
    assert keys == {"routing.models[0].pattern", "routing.models[1].backends", "routing.fallback"}


def test_a_route_may_only_set_race_and_then_narrows_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "backends: [http://127.0.0.1:1=a, http://127.0.0.1:2=b]\n"
        "routing:\n  models:\n    'smol': {race: 2}\n    'big': {backends: [a], race: 3}\n  fallback: b\n"
    )
    config = load_config(config_file=str(path), environ={})
    assert config.routing.models == (ModelRoute("smol", (), 2), ModelRoute("big", ("a",), 3))
    router = ModelRouter(config.routing)
    registry = _registry(a=(), b=())
    assert _names(router.eligible("smol", registry)) == ["a", "b"]  # matched: the fallback is not used
    assert _names(router.eligible("big", registry)) == ["a"]
    assert router.race_for(_facts("smol")) == 2
    assert router.race_for(_facts("other")) == 1
    assert router.race_for(_facts("smol", "/tokenize")) == 1


def test_a_backend_that_joins_or_learns_its_models_later_is_judged_on_what_it_serves_then() -> None:
    registry = _registry(a=("alpha",))
    router = ModelRouter()
    excluded = router.exclusion(_facts("alpha"), registry, ())
    late = registry.add(Backend(name="late", url="http://late", models=("beta",)))
    assert late in excluded  # joined while the claim waited: judged, and it does not serve alpha
    twin = registry.add(Backend(name="twin", url="http://twin", models=("alpha-2",)))
    assert twin not in excluded
    late.health.served_models = ("alpha",)  # the poller replaced its discovered list, and says so
    registry.models_changed()
    assert late not in router.exclusion(_facts("alpha"), registry, ())
