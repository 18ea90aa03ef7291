"""Loading the configuration, in four steps: the raw layers (YAML with the line of every key, the
environment, the flags) -> the schema (pydantic) -> the fleet (server list, backends file, commands
file) -> the domain's cross-checks, passed in. Every problem found on the way is reported together,
in the order of the YAML's lines, as one ``ConfigError``.

``build_config`` is pure (its environment is an argument; nothing global is read or kept), so it can
run again at run time to reload.

The layering is ours, on plain pydantic, not pydantic-settings': a problem names the YAML line or the
variable its value came from, so each layer's keys must stay traceable up to validation, and the
settings sources merge before validating; they also read ``os.environ`` itself, and refuse a comma
list (``LLMBALANCER_BACKENDS``) before validation with an exception of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from llmbalancer.config.fleet import resolve_fleet
from llmbalancer.config.layers import Locations, environment_layer, load_yaml, merge_layers
from llmbalancer.config.problems import ConfigError, Problem, in_line_order
from llmbalancer.config.schema import Config
from llmbalancer.config.secrets import resolve_secrets
from llmbalancer.config.server_list import normalise_routes
from llmbalancer.config.validation import validate

Check = Callable[[Config], Iterable[tuple[str, str]]]
FLAGS = "command line"


def load_layers(
    config_file: str | None, environ: Mapping[str, str], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], Locations]:
    """The merged raw mapping, and where each key in it was written."""
    env = environment_layer(environ)
    named, _ = env.pop("config", (None, ""))
    config_file = overrides.get("config") or named or config_file
    data, lines = load_yaml(str(config_file)) if config_file else ({}, {})
    flags = {key: (value, FLAGS) for key, value in overrides.items() if key != "config"}
    raw, where = merge_layers(data, lines, [env, flags])
    normalise_routes(raw)
    return raw, where


def build_config(
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    default_commands_file: str | None = None,
    checks: Iterable[Check] = (),
    check_executables: bool = False,
) -> Config:
    """Merge the layers and validate them once; raises ConfigError listing every problem.

    ``default_commands_file`` (``serve`` passes ``llamafile_commands.txt``) is launched only when no
    fleet source is given at all and the file exists. ``checks`` are the domain's cross-checks of a
    valid configuration (policy names, routes; ``llmbalancer.configure``), each giving ``(key, message)``
    problems reported with the rest: this package knows no domain module. ``check_executables``
    (``check-config``): an instance whose executable is not there is a problem too.
    """
    environ = os.environ if environ is None else environ
    raw, where = load_layers(config_file, environ, overrides or {})
    validated = validate(raw)
    fleet = resolve_fleet(
        validated.config, environ=environ, where=where, default_commands_file=default_commands_file,
        check_executables=check_executables,
    )
    fleet.config, secret_problems = resolve_secrets(fleet.config, environ)
    later = [*fleet.problems, *secret_problems]
    for check in checks:
        later.extend(Problem(key, text) for key, text in check(fleet.config))

    def locate(problem: Problem) -> Problem:
        # Keys of later steps are numbered as in the (partial) config: where the fleet put an item,
        # else, renumbered as in the file, where the layers say.
        added = fleet.added.of(problem.key)
        if added is not None and problem.line is None and problem.origin is None:
            return validated.renumber(Problem(problem.key, problem.message, *added))
        return where.locate(validated.renumber(problem))

    problems = [where.locate(p) for p in validated.problems] + [locate(p) for p in later]
    if problems:
        raise ConfigError(in_line_order(problems))
    return fleet.config
