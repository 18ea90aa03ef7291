"""Configuration layers, validation with every problem named, backend specs and files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from llmbalancer.config import (
    BackendConfig,
    Config,
    ConfigError,
    DnsTarget,
    InstanceConfig,
    ModelRoute,
    parse_backend_spec,
)
from llmbalancer.config.keys import KeyConfig
from llmbalancer.configure import load_config
from tests.support import REPO


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8088)


def test_flags_beat_environment_which_beats_the_file(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "c.yaml",
        "server:\n  host: 0.0.0.0\n  port: 9000\npolicy:\n  name: round_robin\ntimeouts:\n  connect: 1\n"
        "backends:\n  - http://file:1=file\n",
    )
    environ = {
        "LLMBALANCER_PORT": "9001",
        "LLMBALANCER_POLICY": "hash",
        "LLMBALANCER_TIMEOUTS__CONNECT": "2.5",
        "LLMBALANCER_BACKENDS": "http://env:1=env, http://env:2",
        "UNRELATED": "x",
    }
    env_only = load_config(config_file=config_file, environ=environ)
    assert env_only.server.host == "0.0.0.0"  # from the file, nobody overrode it
    assert env_only.server.port == 9001
    assert env_only.policy.name == "hash"
    assert env_only.timeouts.connect == 2.5
    assert [(b.name, b.url) for b in env_only.backends] == [("env", "http://env:1"), ("env:2", "http://env:2")]

    flags = load_config(
        config_file=config_file, environ=environ,
        overrides={"server.port": 9002, "policy.name": None, "backends": ["http://flag:1=flag"]},
    )
    assert flags.server.port == 9002
    assert flags.policy.name == "hash"  # a flag not given (None) leaves the environment's value
    assert [b.name for b in flags.backends] == ["flag"]


def test_config_file_named_by_environment_or_flag(tmp_path: Path) -> None:
    by_env = _write(tmp_path, "env.yaml", "server:\n  port: 9100\n")
    by_flag = _write(tmp_path, "flag.yaml", "server:\n  port: 9200\n")
    assert load_config(environ={"LLMBALANCER_CONFIG": by_env}).server.port == 9100
    assert load_config(environ={"LLMBALANCER_CONFIG": by_env}, overrides={"config": by_flag}).server.port == 9200


def test_every_problem_is_named_by_key_and_yaml_line(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "bad.yaml",
        "server:\n"                      # 1
        "  port: eighty\n"               # 2
        "  colour: blue\n"               # 3
        "policy:\n"                      # 4
        "  name: fastest\n"              # 5
        "timeouts:\n"                    # 6
        "  connect: -1\n"                # 7
        "logging:\n"                     # 8
        "  format: xml\n"                # 9
        "backends:\n"                    # 10
        "  - url: ftp://nowhere\n"       # 11
        "  - http://a:1=same\n"          # 12
        "  - http://a:2=same\n",         # 13
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    found = {p.key: p.line for p in caught.value.problems}
    assert found == {
        "server.port": 2,
        "server.colour": 3,
        "policy.name": 5,
        "timeouts.connect": 7,
        "logging.format": 9,
        "backends[0].url": 11,
        "backends[2].name": 13,
    }
    text = str(caught.value)
    assert "server.port (line 2)" in text and "unknown key" in text and "fastest" in text


def test_problems_from_the_environment_are_named_too() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"LLMBALANCER_PORT": "high", "LLMBALANCER_LOG_LEVEL": "loud"})
    assert {p.key for p in caught.value.problems} == {"server.port", "logging.level"}


def test_invalid_yaml_names_its_line(tmp_path: Path) -> None:
    config_file = _write(tmp_path, "broken.yaml", "server:\n  port: 1\n bad: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert caught.value.problems[0].line is not None


@pytest.mark.parametrize(
    ("spec", "url", "name"),
    [
        ("http://10.0.0.5:8080=gpu1", "http://10.0.0.5:8080", "gpu1"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080", ""),
        ("  https://host/prefix=edge  ", "https://host/prefix", "edge"),
        ("http://host:1/v1?x=http://y:2", "http://host:1/v1?x=http://y:2", ""),
    ],
)
def test_backend_spec_url_equals_name(spec: str, url: str, name: str) -> None:
    assert parse_backend_spec(spec) == {"url": url, "name": name}


def test_backend_without_a_name_is_named_after_host_and_port_and_loses_its_trailing_slash() -> None:
    config = load_config(environ={}, overrides={"backends": ["http://127.0.0.1:8081/"]})
    assert [(b.name, b.url) for b in config.backends] == [("127.0.0.1:8081", "http://127.0.0.1:8081")]


def test_backends_file_with_comments_adds_to_the_other_backends(tmp_path: Path) -> None:
    backends_file = _write(
        tmp_path, "backends.txt",
        "# the fleet\n\nhttp://127.0.0.1:8081=one   # first\n   http://127.0.0.1:8082\n#http://127.0.0.1:9=off\n",
    )
    config = load_config(environ={}, overrides={"backends": ["http://127.0.0.1:8080=flag"],
                                                  "backends_file": backends_file})
    assert [(b.name, b.url) for b in config.backends] == [
        ("flag", "http://127.0.0.1:8080"),
        ("one", "http://127.0.0.1:8081"),
        ("127.0.0.1:8082", "http://127.0.0.1:8082"),
    ]


def test_missing_backends_file_is_a_named_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"backends_file": "/nonexistent/backends.txt"})
    assert [p.key for p in caught.value.problems] == ["backends_file"]


def test_the_example_config_is_valid_and_holds_the_defaults() -> None:
    config = load_config(config_file=str(REPO / "config.example.yaml"), environ={})
    assert config.server == Config().server
    assert config.timeouts == Config().timeouts


def test_a_backend_spec_keeps_an_equals_sign_that_belongs_to_its_query() -> None:
    from llmbalancer.config import parse_backend_spec

    assert parse_backend_spec("http://h:1/x?a=b") == {"url": "http://h:1/x?a=b", "name": ""}
    assert parse_backend_spec("http://h:1/x?a=b&c=d") == {"url": "http://h:1/x?a=b&c=d", "name": ""}
    assert parse_backend_spec("http://h:1/x?a=b=gpu") == {"url": "http://h:1/x?a=b", "name": "gpu"}
    assert parse_backend_spec("http://10.0.0.5:8080=gpu1") == {"url": "http://10.0.0.5:8080", "name": "gpu1"}


# --- the schema's problems: every one, by key and line, in line order ------------------------------


def test_problems_are_listed_in_the_order_of_the_files_lines_whichever_step_found_them(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "bad.yaml",
        "backends:\n"                    # 1
        "  - http://a:1=same\n"          # 2
        "  - http://a:2=same\n"          # 3  duplicate name: found when the fleet is resolved
        "policy:\n"                      # 4
        "  name: fastest\n"              # 5  unknown policy: a domain cross-check
        "server:\n"                      # 6
        "  port: 70000\n"                # 7  the schema
        "routing:\n"                     # 8
        "  fallback: nobody\n",          # 9  a cross-check
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={"LLMBALANCER_LOG_LEVEL": "loud"})
    problems = caught.value.problems
    assert [(p.key, p.line) for p in problems] == [
        ("backends[1].name", 3), ("policy.name", 5), ("server.port", 7), ("routing.fallback", 9),
        ("logging.level", None),  # from the environment: named by its variable, after the file's
    ]
    assert str(problems[2]) == "server.port (line 7): must be at most 65535, got 70000"
    assert str(problems[4]) == "logging.level (from LLMBALANCER_LOG_LEVEL): must be one of 'debug', 'info', " \
        "'warning' or 'error', got 'loud'"


def test_unknown_keys_are_errors_at_every_level_naming_the_known_ones(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "unknown.yaml",
        "colour: blue\n"                                     # 1
        "timeouts:\n"                                        # 2
        "  conect: 3\n"                                      # 3
        "backends:\n"                                        # 4
        "  - url: http://127.0.0.1:1\n"                      # 5
        "    weight: 2\n"                                    # 6
        "instances:\n"                                       # 7
        "  - command: [/bin/true, --port, '9']\n"            # 8
        "    restarts: never\n"                              # 9
        "routing:\n"                                         # 10
        "  models:\n"                                        # 11
        "    'x.*': {backends: [], racing: 2}\n",            # 12
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert [(p.key, p.line) for p in caught.value.problems] == [
        ("colour", 1), ("timeouts.conect", 3), ("backends[0].weight", 6), ("instances[0].restarts", 9),
        ("routing.models[0].racing", 12),
    ]
    assert all(p.message.startswith("unknown key") for p in caught.value.problems)
    assert "known: connect, first_byte, idle, health" in caught.value.problems[1].message


def test_an_invalid_list_item_leaves_the_others_numbered_as_in_the_file(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "items.yaml",
        "backends:\n"
        "  - name: no-url\n"             # 2
        "  - http://a:1=same\n"          # 3
        "  - http://a:2=same\n",         # 4
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert [(p.key, p.line, p.message) for p in caught.value.problems] == [
        ("backends[0].url", 2, "is required"),
        ("backends[2].name", 4, "duplicate backend name 'same' (also backends[1])"),
    ]


def test_wrong_types_are_named_in_plain_words(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "types.yaml",
        "server: [1, 2]\nretries:\n  attempts: 1.5\nhealth:\n  interval: true\npolicy:\n  hash_key: ip\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert [str(p) for p in caught.value.problems] == [
        "server (line 1): must be a mapping, got list",
        "retries.attempts (line 3): must be a whole number, got 1.5",
        "health.interval (line 5): must be a number, got True",
        "policy.hash_key (line 7): must be 'client' or 'header:<Name>', got 'ip'",
    ]


# --- the environment ---------------------------------------------------------------------------


def test_any_nested_key_is_set_by_its_double_underscore_variable() -> None:
    config = load_config(environ={"LLMBALANCER_TIMEOUTS__CONNECT": "3", "LLMBALANCER_ROUTING__STRICT_MODELS": "yes",
                                  "LLMBALANCER_SERVER__KEEPALIVE_TIMEOUT": "5.5"})
    assert config.timeouts.connect == 3.0 and isinstance(config.timeouts.connect, float)
    assert config.routing.strict_models is True
    assert config.server.keepalive_timeout == 5.5


def test_a_variable_naming_no_key_is_an_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"LLMBALANCER_TIMEOUTS__CONECT": "3", "LLMBALANCER_CACHE_DIR": "/tmp"})
    (problem,) = caught.value.problems
    assert str(problem).startswith("timeouts.conect (from LLMBALANCER_TIMEOUTS__CONECT): unknown key")


def test_the_environment_replaces_the_files_value_and_its_line(tmp_path: Path) -> None:
    config_file = _write(tmp_path, "c.yaml", "server:\n  port: 9000\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={"LLMBALANCER_PORT": "-1"})
    (problem,) = caught.value.problems
    assert (problem.key, problem.line, problem.origin) == ("server.port", None, "LLMBALANCER_PORT")


def test_building_again_gives_the_same_configuration_and_changes_nothing(tmp_path: Path) -> None:
    config_file = _write(tmp_path, "c.yaml", "backends: [http://127.0.0.1:1=a]\nrouting:\n  models: {'x': [a]}\n")
    environ = {"LLMBALANCER_TIMEOUTS__CONNECT": "3"}
    overrides = {"server.port": 9001}
    first = load_config(config_file=config_file, environ=environ, overrides=overrides)
    assert load_config(config_file=config_file, environ=environ, overrides=overrides) == first
    assert environ == {"LLMBALANCER_TIMEOUTS__CONNECT": "3"} and overrides == {"server.port": 9001}


# --- files the configuration names: problems at the key that names them ---------------------------


def test_a_bad_line_of_the_backends_file_names_the_key_its_line_and_the_files_line(tmp_path: Path) -> None:
    backends = _write(tmp_path, "backends.txt", "http://127.0.0.1:1=one\nftp://nowhere\nhttp://127.0.0.1:2=one\n")
    config_file = _write(tmp_path, "c.yaml", f"server:\n  port: 9000\nbackends_file: {backends}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert [str(p) for p in caught.value.problems] == [
        f"backends_file (line 3): {backends} line 2: url must be an http(s) URL with a host, got 'ftp://nowhere'",
        f"backends[1].name (line 3, from {backends} line 3): duplicate backend name 'one' (also backends[0])",
    ]


def test_a_missing_file_names_the_key_and_line_that_name_it(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "c.yaml",
        "server_list: /nonexistent/server-list.json\nsupervisor:\n  commands_file: /nonexistent/cmds.txt\n"
        "backends_file: /nonexistent/backends.txt\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert [(p.key, p.line) for p in caught.value.problems] == [
        ("server_list", 1), ("supervisor.commands_file", 3), ("backends_file", 4),
    ]
    assert all("cannot read /nonexistent/" in p.message for p in caught.value.problems)


# --- config.example.yaml documents every key ------------------------------------------------------


def _sections() -> dict[str, type[BaseModel]]:
    return {
        name: info.annotation for name, info in Config.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
    }


def test_the_example_config_sets_every_key_of_every_section_to_its_default() -> None:
    example = yaml.safe_load((REPO / "config.example.yaml").read_text())
    assert set(example) == set(Config.model_fields)
    defaults = Config().as_dict()
    for section, model in _sections().items():
        for key in model.model_fields:
            assert key in example[section], f"config.example.yaml lacks {section}.{key}"
        documented = {k: v for k, v in example[section].items() if k != "models"}
        assert documented == {k: v for k, v in defaults[section].items() if k != "models"}, section
    for key in ("backends", "backends_file", "instances", "server_list"):
        assert example[key] in (None, []), key


def test_the_example_config_shows_every_key_of_a_backend_an_instance_and_a_route() -> None:
    text = (REPO / "config.example.yaml").read_text()
    for model in (BackendConfig, InstanceConfig, ModelRoute, DnsTarget, KeyConfig):
        for key in model.model_fields:
            assert re.search(rf"^#\s+(- )?{key}:|[{{ ]{key}:", text, re.MULTILINE), f"{model.__name__}.{key}"


def test_a_route_written_as_a_mapping_is_named_by_its_index_and_line(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path, "routes.yaml",
        "backends: [http://127.0.0.1:1=a]\n"   # 1
        "routing:\n"                           # 2
        "  models:\n"                          # 3
        "    'x.*': [a]\n"                     # 4
        "    'y.*':\n"                         # 5
        "      race: 0\n"                      # 6
        "    'z.*': {backends: [a, 5]}\n",     # 7
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert [str(p) for p in caught.value.problems] == [
        "routing.models[1].race (line 6): must be at least 1, got 0",
        "routing.models[2].backends (line 7): names unknown backend(s) 5 for 'z.*'",
    ]


def test_a_section_or_list_left_empty_reads_as_its_default(tmp_path: Path) -> None:
    config_file = _write(tmp_path, "empty.yaml", "server:\n#  port: 1\nbackends:\nrouting:\n  models:\n1: x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=config_file, environ={})
    assert [(p.key, p.line) for p in caught.value.problems] == [("1", 6)]  # a key that is a number: unknown
    config_file = _write(tmp_path, "empty.yaml", "server:\n#  port: 1\nbackends:\nrouting:\n  models:\n")
    assert load_config(config_file=config_file, environ={}) == Config()
