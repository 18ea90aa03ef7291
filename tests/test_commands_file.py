"""The llamafile_commands.txt format, instance URLs and names, and which fleet sources a config uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmbalancer.config import ConfigError, InstanceConfig, fleet_sources
from llmbalancer.config.commands_file import command_url, parse_commands, resolve_instances
from llmbalancer.configure import load_config

ORIGINAL_FORMAT = """\
# the original balancer's format
/opt/llamafile --server --nobrowser --host 0.0.0.0 --port 8080 -m gemma.gguf --alias gemma1

  ${BIN}/llama-server -m "${MODELS}/my model.gguf" --port=8081   # trailing comment
"""


def test_lines_are_split_like_a_shell_with_comments_blank_lines_and_variables() -> None:
    instances = parse_commands(ORIGINAL_FORMAT, {"BIN": "/usr/local/bin", "MODELS": "/m"})
    assert [i.command for i in instances] == [
        ("/opt/llamafile", "--server", "--nobrowser", "--host", "0.0.0.0", "--port", "8080", "-m", "gemma.gguf",
         "--alias", "gemma1"),
        ("/usr/local/bin/llama-server", "-m", "/m/my model.gguf", "--port=8081"),
    ]


def test_an_undefined_variable_is_a_config_error_naming_it_and_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_commands("\n/bin/server --port 1 -m ${NOPE}\n", {}, "cmds.txt")
    (problem,) = caught.value.problems
    assert problem.line == 2 and "NOPE" in problem.message and "cmds.txt" in problem.message


def test_wildcard_host_is_reached_on_loopback_and_port_defaults_to_8080() -> None:
    assert command_url(["llamafile", "--host", "0.0.0.0", "--port", "9000"]) == "http://127.0.0.1:9000"
    assert command_url(["llama-server", "--host", "10.1.2.3", "--port=9001"]) == "http://10.1.2.3:9001"
    assert command_url(["llama-server", "--host", "::1", "--port", "9002"]) == "http://[::1]:9002"
    assert command_url(["llama-server"]) == "http://127.0.0.1:8080"


def test_name_comes_from_alias_or_executable_and_port_and_shared_aliases_get_the_port() -> None:
    resolved, problems = resolve_instances([
        InstanceConfig(command=("/opt/llamafile", "--port", "8080", "--alias", "gemma1")),
        InstanceConfig(command=("/bin/llama-server", "--port", "8081")),
        InstanceConfig(command=("/bin/llama-server", "--port", "8082", "-a", "smol")),
        InstanceConfig(command=("/bin/llama-server", "--port", "8083", "-a", "smol")),
    ])
    assert problems == []
    assert [i.name for i in resolved] == ["gemma1", "llama-server-8081", "smol-8082", "smol-8083"]
    assert resolved[0].url == "http://127.0.0.1:8080"


def test_two_instances_on_one_port_is_a_config_error(tmp_path: Path) -> None:
    commands = tmp_path / "cmds.txt"
    commands.write_text("/bin/a --port 8080\n/bin/b --host 0.0.0.0 --port 8080\n")
    with pytest.raises(ConfigError, match="port 8080"):
        load_config(environ={}, overrides={"supervisor.commands_file": str(commands)})


def test_yaml_instance_command_may_be_a_string_and_its_url_is_derived(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("instances:\n  - command: /bin/llama-server --port 9100 -m 'a b.gguf'\n    restart: never\n")
    config = load_config(config_file=str(config_file), environ={})
    (instance,) = config.instances
    assert instance.command == ("/bin/llama-server", "--port", "9100", "-m", "a b.gguf")
    assert (instance.url, instance.name, instance.restart) == ("http://127.0.0.1:9100", "llama-server-9100", "never")


def _default_file(tmp_path: Path) -> str:
    path = tmp_path / "llamafile_commands.txt"
    path.write_text("/bin/server --port 9200 -a x\n")
    return str(path)


def test_default_commands_file_is_launched_when_no_fleet_source_is_given(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={}, default_commands_file=_default_file(tmp_path))
    assert [i.name for i in config.instances] == ["x"]
    assert fleet_sources(config) == [f"commands_file {tmp_path}/llamafile_commands.txt", "supervised instances (1)"]


def test_default_commands_file_is_ignored_when_a_backend_is_given(tmp_path: Path) -> None:
    overrides = {"backends": ["http://127.0.0.1:9300"]}
    config = load_config(environ={}, overrides=overrides, default_commands_file=_default_file(tmp_path))
    assert config.instances == ()
    assert fleet_sources(config) == ["backends (1)"]


def test_a_missing_default_commands_file_is_no_error(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={}, default_commands_file=str(tmp_path / "absent.txt"))
    assert config.instances == () and fleet_sources(config) == []


def test_yaml_instance_commands_expand_variables_as_a_commands_file_does(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "instances:\n"
        "  - command: ${BIN}/llama-server --port 9100 -m '${MODELS}/a b.gguf'\n"
        "  - command: [\"${BIN}/llama-server\", --port, '9101']\n"
    )
    config = load_config(config_file=str(config_file), environ={"BIN": "/opt/bin", "MODELS": "/m"})
    assert [i.command for i in config.instances] == [
        ("/opt/bin/llama-server", "--port", "9100", "-m", "/m/a b.gguf"),
        ("/opt/bin/llama-server", "--port", "9101"),
    ]
    assert config.instances[0].name == "llama-server-9100"


def test_an_undefined_variable_in_a_yaml_instance_names_its_key_and_line(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("server:\n  port: 9000\ninstances:\n  - command: ${NOPE}/llama-server --port 9100\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=str(config_file), environ={})
    (problem,) = caught.value.problems
    assert str(problem) == "instances[0].command (line 4): undefined environment variable(s): NOPE"


def test_a_commands_file_problem_names_the_key_naming_the_file_and_the_files_line(tmp_path: Path) -> None:
    commands = tmp_path / "cmds.txt"
    commands.write_text("/bin/a --port 8080\n/bin/b -m ${NOPE}\n/bin/c --port 8080\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"logging:\n  level: info\nsupervisor:\n  commands_file: {commands}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=str(config_file), environ={})
    assert [str(p) for p in caught.value.problems] == [  # every problem of the file, not the first
        f"supervisor.commands_file (line 4): {commands} line 2: undefined environment variable(s): NOPE",
        f"instances[1] (line 4, from {commands} line 3): listens on port 8080, as does instances[0] "
        "(/bin/c --port 8080)",
    ]


def test_a_missing_executable_is_a_problem_only_when_asked_for(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "instances:\n"
        f"  - command: [{sys.executable}, --port, '9100']\n"
        "  - command: no-such-server-binary --port 9101\n"
        "  - command: ./server --port 9102\n"
        f"    cwd: {tmp_path}\n"
        f"  - command: {config_file} --port 9103\n"
    )
    environ = {"PATH": str(tmp_path)}
    config = load_config(config_file=str(config_file), environ=environ)  # as serve: the others start
    assert len(config.instances) == 4
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=str(config_file), environ=environ, check_executables=True)
    assert [str(p) for p in caught.value.problems] == [
        "instances[1].command (line 3): executable 'no-such-server-binary' not found on PATH",
        f"instances[2].command (line 4): executable './server' does not exist (relative to {tmp_path})",
        f"instances[3].command (line 6): '{config_file}' is not executable",
    ]
