"""A llama-server started without --alias names its model by its GGUF path: clients may still say the file's
stem (any case), and a fleet that serves one model answers any name (as llama-server itself does) unless
`routing.strict_models`."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from llmbalancer.config import RoutingConfig
from llmbalancer.fleet.backend import Backend, BackendState
from llmbalancer.scheduling.model_routing import ModelRouter, instances
from tests.support import make_config, run_balancer, start_llama_server, wait_for, wait_ready

GGUF = "/root/.cache/llmbalancer/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def _serving(name: str, *models: str) -> Backend:
    backend = Backend(name=name, url=f"http://{name}", state=BackendState.HEALTHY)
    backend.health.served_models = models
    return backend


def test_a_model_file_is_named_by_its_path_or_its_stem_in_any_case() -> None:
    assert instances("SmolLM2-135M-Instruct.Q4_1", [GGUF]) == [GGUF]
    assert instances("smollm2-135m-instruct.q4_1", [GGUF]) == [GGUF]
    assert instances(GGUF, [GGUF]) == [GGUF]
    assert instances("SMOLLM2", ["smollm2"]) == ["smollm2"]
    assert instances("llama3.1", ["llama3"]) == []  # a dot in a name is not an extension


def test_a_single_model_fleet_answers_any_name_unless_strict() -> None:
    fleet = [_serving("a", GGUF), _serving("b", GGUF)]
    assert ModelRouter().eligible("smollm2", fleet) == fleet
    assert ModelRouter(RoutingConfig(strict_models=True)).eligible("smollm2", fleet) == []
    assert ModelRouter(RoutingConfig(strict_models=True)).eligible("SmolLM2-135M-Instruct.Q4_1", fleet) == fleet
    mixed = [_serving("a", GGUF), _serving("b", "qwen")]
    assert ModelRouter().eligible("smollm2", mixed) == []  # two models: a name neither serves is unknown


async def test_a_llama_server_without_alias_answers_its_stem_and_any_name_through_the_balancer(
    tmp_path: Path,
) -> None:
    server = start_llama_server(tmp_path, slots=1, alias=None)
    try:
        wait_ready(server.url)
        async with run_balancer(make_config([server.url])) as balancer, aiohttp.ClientSession() as session:
            backend = balancer.components.registry.backends[0]
            await wait_for(lambda: backend.health.served_models, timeout=10)
            assert backend.health.served_models[0].endswith(".gguf")  # the model's id is its path
            for name in ("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct.q4_1", "smollm2", "gpt-4o"):
                body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                async with session.post(balancer.url + "/v1/chat/completions", json=body) as reply:
                    assert reply.status == 200, (name, await reply.text())
        strict = make_config([server.url], **{"routing.strict_models": True})
        async with run_balancer(strict) as balancer, aiohttp.ClientSession() as session:
            backend = balancer.components.registry.backends[0]
            await wait_for(lambda: backend.health.served_models, timeout=10)
            body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with session.post(balancer.url + "/v1/chat/completions", json=body) as reply:
                assert reply.status == 404
                assert (await reply.json())["error"]["code"] == "model_not_found"
    finally:
        server.stop()
