"""The raw layers, lowest precedence first: the YAML file (with the line of every key), the environment
(``LLMBALANCER_*``), command-line flags; merged into one raw mapping, remembering where each key was
written (``Locations``) so that a problem found later names its YAML line or its variable."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from llmbalancer.config.problems import ConfigError, Problem

# --- the YAML file -----------------------------------------------------------------------------

_ROUTES = "routing.models"


def load_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's mapping, and the line of every dotted key (for error messages).

    ``routing.models`` written as a mapping ``pattern: [backends]`` is indexed as the list it becomes
    (``routing.models[0].backends``: see ``server_list.routes_from_mapping``)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([Problem("config", f"cannot read {path}: {exc.strerror}")]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(
            [Problem("config", f"{path} is not valid YAML: {exc}", mark.line + 1 if mark else None)]
        ) from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", f"{path} must hold a mapping at the top level", 1)])
    lines: dict[str, int] = {}
    _index_lines(node, "", lines)
    return _string_keys(data), lines


def _string_keys(value: Any) -> Any:
    """Every key is a name: ``1: x`` is the (unknown) key ``1``, as the line index has it."""
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_string_keys(v) for v in value]
    return value


def _index_lines(node: yaml.Node | None, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode) and prefix == _ROUTES:
        for index, (key_node, value_node) in enumerate(node.value):
            route = f"{prefix}[{index}]"
            lines[route] = lines[f"{route}.pattern"] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                _index_lines(value_node, route, lines)
            else:
                lines[f"{route}.backends"] = key_node.start_mark.line + 1
                _index_lines(value_node, f"{route}.backends", lines)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _index_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = f"{prefix}[{index}]"
            lines[key] = item.start_mark.line + 1
            _index_lines(item, key, lines)


# --- the environment ---------------------------------------------------------------------------

# Flags and their environment variables set these dotted keys.
ENV_KEYS: dict[str, str] = {
    "LLMBALANCER_CONFIG": "config",
    "LLMBALANCER_HOST": "server.host",
    "LLMBALANCER_PORT": "server.port",
    "LLMBALANCER_POLICY": "policy.name",
    "LLMBALANCER_BACKENDS": "backends",
    "LLMBALANCER_BACKENDS_FILE": "backends_file",
    "LLMBALANCER_COMMANDS": "supervisor.commands_file",
    "LLMBALANCER_LOG_FORMAT": "logging.format",
    "LLMBALANCER_LOG_LEVEL": "logging.level",
}
SERVER_LIST_VARIABLE = "SERVER_LIST_JSON"  # llama-balancer's own variable, for drop-in compatibility
_NOT_SETTINGS = frozenset({"LLMBALANCER_CACHE_DIR"})  # the llama-server rig's, not a key


def environment_layer(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """``LLMBALANCER_*`` variables as dotted keys, each with the variable that set it;
    ``LLMBALANCER_TIMEOUTS__CONNECT`` reaches any key; ``LLMBALANCER_BACKENDS`` is a comma list."""
    layer: dict[str, tuple[Any, str]] = {}
    for name, value in environ.items():
        if name == SERVER_LIST_VARIABLE:
            layer["server_list"] = (value, name)
            continue
        if not name.startswith("LLMBALANCER_") or name in _NOT_SETTINGS:
            continue
        if name in ENV_KEYS:
            key = ENV_KEYS[name]
        elif "__" in name:
            key = name.removeprefix("LLMBALANCER_").lower().replace("__", ".")
        else:
            continue
        layer[key] = ([v.strip() for v in value.split(",") if v.strip()] if key == "backends" else value, name)
    return layer


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``environment_layer`` without where each came from."""
    return {key: value for key, (value, _) in environment_layer(environ).items()}


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment less the variables that set configuration keys: what ``${VAR}`` and ``PATH``
    are read from when only a file is checked (``check-config``)."""
    return {k: v for k, v in environ.items() if not environment_layer({k: v})}


# --- where each key came from ------------------------------------------------------------------

Location = tuple[int | None, str | None]  # (YAML line, other origin)
_PARENT = re.compile(r"^(.*)(?:\.[^.\[\]]*|\[\d+\])$")


@dataclass
class Locations:
    """Dotted key -> where it was written; a key not recorded is where its nearest recorded parent is."""

    at: dict[str, Location] = field(default_factory=dict)

    def of(self, key: str) -> Location | None:
        while key:
            if key in self.at:
                return self.at[key]
            parent = _PARENT.match(key)
            key = parent.group(1) if parent else ""
        return None

    def line(self, key: str) -> int | None:
        location = self.of(key)
        return location[0] if location else None

    def derive(self, key: str, anchor: Location | None, origin: str) -> None:
        """``key`` came from ``origin``, in a file named at ``anchor`` (a server list, a commands file)."""
        line, anchor_origin = anchor or (None, None)
        self.at[key] = (line, f"{origin} ({anchor_origin})" if anchor_origin else origin)

    def forget(self, key: str) -> None:
        """A later layer set ``key``: the file's lines for it and below no longer apply."""
        for known in [k for k in self.at if k == key or k.startswith((f"{key}.", f"{key}["))]:
            del self.at[known]

    def locate(self, problem: Problem) -> Problem:
        if problem.line is not None or problem.origin is not None:
            return problem
        line, origin = self.of(problem.key) or (None, None)
        return replace(problem, line=line, origin=origin)


def merge_layers(
    data: Mapping[str, Any], lines: Mapping[str, int], layers: Iterable[Mapping[str, tuple[Any, str]]]
) -> tuple[dict[str, Any], Locations]:
    """The file's mapping with each later layer's dotted keys set over it (a list replaces a list)."""
    raw = copy.deepcopy(dict(data))
    where = Locations({key: (line, None) for key, line in lines.items()})
    for layer in layers:
        for key, (value, origin) in layer.items():
            if value is None or (key == "backends" and not value):
                continue  # a flag not given; an empty list of backends
            _set_dotted(raw, key, value)
            where.forget(key)
            where.at[key] = (None, origin)
    return raw, where


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value
