"""Resolving the fleet, once the schema has validated the configuration: the server list's backends,
routes and fallback; the backends file; the commands file (or ``serve``'s default one); ``${VAR}`` in
the YAML's instance commands; every backend and instance named once.

What a file adds is located at the key that names the file (its YAML line, or its variable) and at
its own line in that file, so that every problem, a later cross-check's too, says where to look.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmbalancer.config import commands_file, server_list
from llmbalancer.config.layers import Locations
from llmbalancer.config.problems import ConfigError, Problem
from llmbalancer.config.schema import BackendConfig, Config, InstanceConfig, ModelRoute, parse_backend_spec
from llmbalancer.config.validation import dotted, message

_Model = TypeVar("_Model", bound=BaseModel)


@dataclass
class Fleet:
    config: Config
    problems: list[Problem] = field(default_factory=list)
    # Where the items added here came from, numbered as in ``config`` (``backends[3]``).
    added: Locations = field(default_factory=Locations)


def resolve_fleet(
    config: Config,
    *,
    environ: Mapping[str, str],
    where: Locations,
    default_commands_file: str | None = None,
    check_executables: bool = False,
) -> Fleet:
    fleet = Fleet(config)
    if default_commands_file and not _names_fleet_source(config) and Path(default_commands_file).is_file():
        supervisor = config.supervisor.model_copy(update={"commands_file": default_commands_file})
        fleet.config = config.model_copy(update={"supervisor": supervisor})
        fleet.added.at[commands_file.KEY] = (None, "default")
    _add_server_list(fleet, where)
    _add_backends_file(fleet, where)
    _name_backends_once(fleet)
    _resolve_instances(fleet, where, environ, check_executables)
    return fleet


def _names_fleet_source(config: Config) -> bool:
    return bool(
        config.backends or config.backends_file or config.server_list or config.instances
        or config.supervisor.commands_file
    )


def fleet_sources(config: Config) -> list[str]:
    """Where this configuration's backends come from, for the start-up log."""
    sources = []
    if config.backends:
        sources.append(f"backends ({len(config.backends)})")
    if config.backends_file:
        sources.append(f"backends_file {config.backends_file}")
    if config.server_list:
        sources.append(f"server_list {config.server_list}")
    if config.supervisor.commands_file:
        sources.append(f"commands_file {config.supervisor.commands_file}")
    if config.instances:
        sources.append(f"supervised instances ({len(config.instances)})")
    if config.discovery.dns:
        sources.append(f"dns ({', '.join(target.name for target in config.discovery.dns)})")
    return sources


def _validated(model: type[_Model], data: Any, key: str, where: str, problems: list[Problem]) -> _Model | None:
    """``data`` as ``model``, or None with its problems named by ``key`` (and ``where``, in words)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            field_key = dotted(error["loc"])
            problems.append(Problem(key, f"{where}{field_key + ' ' if field_key else ''}{message(error, ())}"))
        return None


# --- backends ----------------------------------------------------------------------------------


def _add_server_list(fleet: Fleet, where: Locations) -> None:
    """Its servers after the other backends, its routes after the config's, its fallback unless the
    config names one."""
    path = fleet.config.server_list
    if not path:
        return
    try:
        specs, route_specs, fallback = server_list.read_server_list(path)
    except server_list.ServerListError as exc:
        fleet.problems.extend(exc.problems)
        return
    anchor = where.of(server_list.KEY)
    backends = list(fleet.config.backends)
    for spec in specs:
        key = f"{server_list.KEY}.servers.{spec['name']}"
        backend = _validated(BackendConfig, spec, key, "", fleet.problems)
        if backend is not None:
            fleet.added.derive(f"backends[{len(backends)}]", anchor, path)
            backends.append(backend)
    routing = fleet.config.routing
    routes = list(routing.models)
    for spec in route_specs:
        route = _validated(ModelRoute, spec, f"{server_list.KEY}.models", f"{spec['pattern']!r}: ", fleet.problems)
        if route is not None:
            fleet.added.derive(f"routing.models[{len(routes)}]", anchor, path)
            routes.append(route)
    update: dict[str, Any] = {"models": tuple(routes)}
    if routing.fallback is None and fallback is not None:
        update["fallback"] = fallback
        fleet.added.derive("routing.fallback", anchor, path)
    fleet.config = fleet.config.model_copy(
        update={"backends": tuple(backends), "routing": routing.model_copy(update=update)}
    )


def read_backends_lines(path: str) -> list[tuple[int, dict[str, str]]]:
    """``URL[=name]`` per line, ``#`` comments; each with its line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([Problem("backends_file", f"cannot read {path}: {exc.strerror}")]) from exc
    specs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            specs.append((number, parse_backend_spec(line)))
    return specs


def read_backends_file(path: str) -> list[dict[str, str]]:
    return [spec for _, spec in read_backends_lines(path)]


def _add_backends_file(fleet: Fleet, where: Locations) -> None:
    path = fleet.config.backends_file
    if not path:
        return
    try:
        specs = read_backends_lines(path)
    except ConfigError as exc:
        fleet.problems.extend(exc.problems)
        return
    anchor = where.of("backends_file")
    backends = list(fleet.config.backends)
    for number, spec in specs:
        backend = _validated(BackendConfig, spec, "backends_file", f"{path} line {number}: ", fleet.problems)
        if backend is not None:
            fleet.added.derive(f"backends[{len(backends)}]", anchor, f"{path} line {number}")
            backends.append(backend)
    fleet.config = fleet.config.model_copy(update={"backends": tuple(backends)})


def _name_backends_once(fleet: Fleet) -> None:
    seen: dict[str, int] = {}
    backends = []
    for index, backend in enumerate(fleet.config.backends):
        if backend.name in seen:
            fleet.problems.append(
                Problem(f"backends[{index}].name",
                        f"duplicate backend name {backend.name!r} (also backends[{seen[backend.name]}])")
            )
            continue
        seen[backend.name] = index
        backends.append(backend)
    fleet.config = fleet.config.model_copy(update={"backends": tuple(backends)})


# --- instances ---------------------------------------------------------------------------------


def _resolve_instances(fleet: Fleet, where: Locations, environ: Mapping[str, str], check_executables: bool) -> None:
    """``${VAR}`` expanded in the YAML's commands; the commands file's added after them; then each
    given its URL and name (one port each), and, when asked, its executable looked for."""
    instances: list[InstanceConfig] = []
    for index, instance in enumerate(fleet.config.instances):
        command, missing = commands_file.expand_variables(instance.command, environ)
        if missing:
            fleet.problems.append(Problem(f"instances[{index}].command", commands_file.undefined_message(missing)))
        instances.append(instance.model_copy(update={"command": command}))
    path = fleet.config.supervisor.commands_file
    if path:
        anchor = fleet.added.of(commands_file.KEY) or where.of(commands_file.KEY)
        try:
            listed, problems = commands_file.scan_commands(commands_file.read_commands_text(path), environ, path)
        except ConfigError as exc:
            listed, problems = [], exc.problems
        # The file's line is in each message: the problem's line is the YAML's, where the file is named.
        fleet.problems.extend(Problem(p.key, p.message) for p in problems)
        for number, instance in listed:
            fleet.added.derive(f"instances[{len(instances)}]", anchor, f"{path} line {number}")
            instances.append(instance)
    if check_executables:
        fleet.problems.extend(executable_problems(instances, environ))
    resolved, problems = commands_file.resolve_instances(instances)
    fleet.problems.extend(problems)
    fleet.config = fleet.config.model_copy(update={"instances": resolved})


def executable_problems(instances: Sequence[InstanceConfig], environ: Mapping[str, str]) -> list[Problem]:
    """Instances whose executable is not there to start. Not an error for ``serve``, which starts the
    others and marks such an instance failed; ``check-config`` reports it."""
    problems = []
    for index, instance in enumerate(instances):
        if not instance.command or commands_file.has_variable(instance.command[0]):
            continue  # reported already: empty, or an undefined variable
        why = commands_file.executable_problem(instance.command, {**environ, **instance.env}, instance.cwd)
        if why is not None:
            problems.append(Problem(f"instances[{index}].command", why))
    return problems

