"""Configuration layers, validation with every problem named, backend specs and files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmbalancer.config import Config, ConfigError, parse_backend_spec
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
