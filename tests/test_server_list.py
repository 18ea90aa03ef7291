"""llama-balancer's server-list.json, as its README shows it, loads and routes as it did there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmbalancer.cli import _overrides, _parser
from llmbalancer.config import ConfigError
from llmbalancer.configure import load_config
from tests.model_fleet import fake_ollamas
from tests.support import run_balancer

# The example from llama-balancer's README, verbatim.
README_EXAMPLE = """{
  "servers": {
    "PC1": { "addr": "http://192.168.1.20", "health-port": 18000, "model-port": 8081, "request-max": 1 },
    "PC2": { "addr": "http://192.168.1.21", "health-port": 18000, "model-port": 8081 }
  },
  "models": {
    "gpt-oss:20b-64k.*": [
      "PC1",
      "PC2"
    ],
    "gpt-oss:20b-128k.*": [
      "PC1"
    ]
  },
  "fallback_server": "PC2"
}
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "server-list.json"
    path.write_text(text)
    return str(path)


def test_the_readme_example_loads_from_server_list_json_env_as_backends_routes_and_fallback(tmp_path: Path) -> None:
    config = load_config(environ={"SERVER_LIST_JSON": _write(tmp_path, README_EXAMPLE)})
    assert [(b.name, b.url, b.max_concurrency) for b in config.backends] == [
        ("PC1", "http://192.168.1.20:8081", 1),
        ("PC2", "http://192.168.1.21:8081", None),
    ]
    assert [(r.pattern, r.backends) for r in config.routing.models] == [
        ("gpt-oss:20b-64k.*", ("PC1", "PC2")),
        ("gpt-oss:20b-128k.*", ("PC1",)),
    ]
    assert config.routing.fallback == "PC2"


def test_the_server_list_flag_names_the_file(tmp_path: Path) -> None:
    args = _parser().parse_args(["serve", "--server-list", _write(tmp_path, README_EXAMPLE)])
    config = load_config(environ={}, overrides=_overrides(args))
    assert [b.name for b in config.backends] == ["PC1", "PC2"]


def test_without_fallback_server_the_first_server_takes_unmatched_models_as_in_llama_balancer(tmp_path: Path) -> None:
    data = json.loads(README_EXAMPLE)
    del data["fallback_server"]
    config = load_config(environ={"SERVER_LIST_JSON": _write(tmp_path, json.dumps(data))})
    assert config.routing.fallback == "PC1"


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"addr": "192.168.1.20", "model-port": 8081}, "server_list.servers.PC1.addr"),
        ({"addr": "http://h", "model-port": "8081"}, "server_list.servers.PC1.model-port"),
        ({"addr": "http://h", "model-port": 8081, "request-max": 0}, "server_list.servers.PC1.request-max"),
        ({"addr": "http://h", "model-port": 8081, "health-port": 70000}, "server_list.servers.PC1.health-port"),
    ],
)
def test_a_bad_server_entry_is_named_by_its_key(tmp_path: Path, server: dict[str, Any], key: str) -> None:
    path = _write(tmp_path, json.dumps({"servers": {"PC1": server}}))
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"SERVER_LIST_JSON": path})
    assert [p.key for p in caught.value.problems] == [key]


def test_a_route_naming_an_unknown_server_or_an_invalid_file_is_reported(tmp_path: Path) -> None:
    data = json.loads(README_EXAMPLE)
    data["models"]["x.*"] = ["PC9"]
    with pytest.raises(ConfigError, match="PC9"):
        load_config(environ={"SERVER_LIST_JSON": _write(tmp_path, json.dumps(data))})
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(environ={"SERVER_LIST_JSON": _write(tmp_path, "{servers")})


async def test_the_readme_routes_send_each_model_where_llama_balancer_sent_it(tmp_path: Path) -> None:
    names = ["gpt-oss:20b-64k", "gpt-oss:20b-128k-q8", "llama3"]
    async with fake_ollamas(names, names) as (pc1, pc2):
        data = json.loads(README_EXAMPLE)
        for name, fake in (("PC1", pc1), ("PC2", pc2)):
            data["servers"][name].update({"addr": "http://127.0.0.1", "model-port": fake.port})
        config = load_config(
            environ={"SERVER_LIST_JSON": _write(tmp_path, json.dumps(data))},
            overrides={"policy.name": "round_robin", "logging.format": "json", "health.interval": 0.2},
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            for model in ["gpt-oss:20b-64k"] * 4 + ["gpt-oss:20b-128k-q8"] * 2 + ["llama3"] * 2:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with session.post(balancer.url + "/v1/chat/completions", json=body) as reply:
                    assert reply.status == 200, await reply.text()
        assert dict(pc1.served) == {"gpt-oss:20b-64k": 2, "gpt-oss:20b-128k-q8": 2}
        assert dict(pc2.served) == {"gpt-oss:20b-64k": 2, "llama3": 2}


def test_a_server_list_problem_names_the_line_that_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps({"servers": {"PC1": {"addr": "192.168.1.20", "model-port": 8081}}}))
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"server:\n  port: 9000\nserver_list: {path}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=str(config_file), environ={})
    (problem,) = caught.value.problems
    assert str(problem).startswith("server_list.servers.PC1.addr (line 3): must be a base URL")


def test_a_route_from_the_server_list_is_located_in_that_file(tmp_path: Path) -> None:
    data = json.loads(README_EXAMPLE)
    data["models"]["x.*"] = ["PC9"]
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"SERVER_LIST_JSON": _write(tmp_path, json.dumps(data))})
    (problem,) = caught.value.problems
    assert str(problem) == (
        f"routing.models[2].backends (from {tmp_path}/server-list.json (SERVER_LIST_JSON)): "
        "names unknown backend(s) PC9 for 'x.*'"
    )
