"""Supervised instances: the ``llamafile_commands.txt`` format, and what a command line says about its server.

One command per line, as the original llamafile balancer read them::

    # comments and blank lines are ignored; ${VAR} comes from the environment (an undefined one is an error)
    ${HOME}/bin/llamafile --server --nobrowser --host 0.0.0.0 --port 8080 -m gemma.gguf --alias gemma1

A line is split like a shell would (``shlex``) but never run through one. Its backend URL comes from
``--host``/``--port`` (``0.0.0.0`` is reached on 127.0.0.1), its name from ``--alias``/``-a`` or the
executable and port. The same resolution applies to ``instances:`` written in the YAML config.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from llmbalancer.config.problems import ConfigError, Problem
from llmbalancer.config.schema import InstanceConfig

KEY = "supervisor.commands_file"
# llama-server's and llamafile's own defaults when a command does not say.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def expand_variables(tokens: Sequence[str], environ: Mapping[str, str]) -> tuple[tuple[str, ...], list[str]]:
    """Each ``${VAR}`` replaced by its value in ``environ``; and the undefined ones, sorted (when there
    are any, the tokens come back as they were). The one expansion of both a commands file's lines and
    the YAML's ``instances[].command``, after the split (a value with spaces stays one argument)."""
    missing = sorted({name for token in tokens for name in _VAR.findall(token) if name not in environ})
    if missing:
        return tuple(tokens), missing
    return tuple(_VAR.sub(lambda match: environ[match.group(1)], token) for token in tokens), []


def has_variable(token: str) -> bool:
    return _VAR.search(token) is not None


def undefined_message(names: Sequence[str]) -> str:
    return f"undefined environment variable(s): {', '.join(names)}"


def read_commands_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError([Problem(KEY, f"cannot read {path}: {exc.strerror}")]) from exc


def read_commands_file(path: str, environ: Mapping[str, str]) -> list[InstanceConfig]:
    return parse_commands(read_commands_text(path), environ, path)


def parse_commands(text: str, environ: Mapping[str, str], source: str = "commands file") -> list[InstanceConfig]:
    """Every problem is collected, each with its line (in ``line`` and in the message), and raised
    together as one ConfigError."""
    instances, problems = scan_commands(text, environ, source)
    if problems:
        raise ConfigError(problems)
    return [instance for _, instance in instances]


def scan_commands(
    text: str, environ: Mapping[str, str], source: str = "commands file"
) -> tuple[list[tuple[int, InstanceConfig]], list[Problem]]:
    """The instances of the lines that are valid, each with its line; and the others' problems."""
    instances: list[tuple[int, InstanceConfig]] = []
    problems: list[Problem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{source} line {number}"
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:  # an unclosed quote
            problems.append(Problem(KEY, f"{where}: cannot split the command: {exc}", number))
            continue
        if not tokens:
            continue
        command, missing = expand_variables(tokens, environ)
        if missing:
            problems.append(Problem(KEY, f"{where}: {undefined_message(missing)}", number))
            continue
        try:
            command_address(command)
        except ValueError as exc:
            problems.append(Problem(KEY, f"{where}: {exc}", number))
            continue
        instances.append((number, InstanceConfig(command=command)))
    return instances, problems


def executable_problem(command: Sequence[str], environ: Mapping[str, str], cwd: str | None = None) -> str | None:
    """Why ``command[0]`` cannot be started, as the supervisor would start it (searched on the ``PATH``
    of ``environ`` when it names no directory, else relative to ``cwd``), or None."""
    program = command[0]
    if os.sep not in program:
        if shutil.which(program, path=environ.get("PATH", os.defpath)) is None:
            return f"executable {program!r} not found on PATH"
        return None
    path = Path(cwd or ".") / program  # an absolute one stays itself
    if not path.exists():
        relative = f" (relative to {cwd})" if cwd and path != Path(program) else ""
        return f"executable {program!r} does not exist{relative}"
    if not path.is_file() or not os.access(path, os.X_OK):
        return f"{program!r} is not executable"
    return None


def _flag_value(command: Sequence[str], *flags: str) -> str | None:
    """The value of the last occurrence of any of ``flags`` (``--port 8080`` or ``--port=8080``)."""
    value = None
    for index, token in enumerate(command[1:], start=1):
        for flag in flags:
            if token == flag and index + 1 < len(command):
                value = command[index + 1]
            elif token.startswith(flag + "="):
                value = token[len(flag) + 1 :]
    return value


def command_address(command: Sequence[str]) -> tuple[str, int]:
    """Where the server a command starts will listen, as a client reaches it."""
    host = _flag_value(command, "--host") or DEFAULT_HOST
    port_text = _flag_value(command, "--port")
    if port_text is None:
        port = DEFAULT_PORT
    elif not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--port must be a port number, got {port_text!r}")
    else:
        port = int(port_text)
    if host in _WILDCARD_HOSTS:
        host = DEFAULT_HOST
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host, port


def command_url(command: Sequence[str]) -> str:
    host, port = command_address(command)
    return f"http://{host}:{port}"


def _port_of(instance: InstanceConfig) -> int | None:
    try:
        return urlsplit(instance.url).port if instance.url else command_address(instance.command)[1]
    except ValueError:
        return None


def _default_name(command: Sequence[str]) -> str:
    alias = _flag_value(command, "--alias", "-a")
    return alias or f"{Path(command[0]).name}-{command_address(command)[1]}"


def safe_name(name: str) -> str:
    """A name usable as a log file name."""
    return _UNSAFE_NAME.sub("_", name).strip("._") or "instance"


def resolve_instances(instances: Sequence[InstanceConfig]) -> tuple[tuple[InstanceConfig, ...], list[Problem]]:
    """Fill in each instance's URL and name, and reject two instances on one port or with one name.

    Several servers often share one ``--alias`` (the model's name); each is then named ``alias-port``.
    """
    problems: list[Problem] = []
    valid: list[tuple[int, InstanceConfig]] = []
    for index, instance in enumerate(instances):
        key = f"instances[{index}]"
        if not instance.command:
            problems.append(Problem(f"{key}.command", "must not be empty"))
            continue
        try:
            url = instance.url.rstrip("/") or command_url(instance.command)
        except ValueError as exc:
            problems.append(Problem(f"{key}.command", str(exc)))
            continue
        valid.append((index, instance.model_copy(update={"url": url})))

    defaults = Counter(_default_name(i.command) for _, i in valid if not i.name)
    resolved: list[InstanceConfig] = []
    names: dict[str, int] = {}
    ports: dict[int, int] = {}
    for index, instance in valid:
        key = f"instances[{index}]"
        name = instance.name
        if not name:
            name = _default_name(instance.command)
            if defaults[name] > 1:
                name = f"{name}-{_port_of(instance)}"
        port = _port_of(instance)
        if port is not None and port in ports:
            problems.append(
                Problem(key, f"listens on port {port}, as does instances[{ports[port]}] ({' '.join(instance.command)})")
            )
            continue
        if name in names:
            problems.append(Problem(f"{key}.name", f"duplicate instance name {name!r} (also instances[{names[name]}])"))
            continue
        if port is not None:
            ports[port] = index
        names[name] = index
        resolved.append(instance.model_copy(update={"name": name}))
    return tuple(resolved), problems


def api_key_of(command: tuple[str, ...]) -> str | None:
    """The key a llama-server command line starts the server with (``--api-key K`` or ``--api-key=K``): the
    balancer probes and calls it with that key."""
    for index, word in enumerate(command):
        if word == "--api-key" and index + 1 < len(command):
            return command[index + 1]
        if word.startswith("--api-key="):
            return word.partition("=")[2] or None
    return None
