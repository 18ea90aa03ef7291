"""Loading the configuration: the YAML file (with the line of every key), the environment, the flags,
merged and validated once into ``Config``; every problem is reported together as ``ConfigError``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from llmbalancer.config.commands_file import read_commands_file, resolve_instances
from llmbalancer.config.schema import Config, ConfigError, Problem
from llmbalancer.config.server_list import merge_server_list, normalise_routes

# --- raw layers -------------------------------------------------------------------------------


def load_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's mapping, and the line of every dotted key (for error messages)."""
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
        raise ConfigError([Problem("config", f"{path} must hold a mapping at the top level")])
    lines: dict[str, int] = {}
    _index_lines(node, "", lines)
    return data, lines


def _index_lines(node: yaml.Node | None, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _index_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = f"{prefix}[{index}]"
            lines[key] = item.start_mark.line + 1
            _index_lines(item, key, lines)


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


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``LLMBALANCER_*`` variables as dotted keys; ``LLMBALANCER_TIMEOUTS__CONNECT`` reaches any key."""
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if name == "SERVER_LIST_JSON":  # llama-balancer's own variable, for drop-in compatibility
            overrides["server_list"] = value
            continue
        if not name.startswith("LLMBALANCER_") or name == "LLMBALANCER_CACHE_DIR":
            continue
        if name in ENV_KEYS:
            key = ENV_KEYS[name]
        elif "__" in name:
            key = name.removeprefix("LLMBALANCER_").lower().replace("__", ".")
        else:
            continue
        overrides[key] = [v.strip() for v in value.split(",") if v.strip()] if key == "backends" else value
    return overrides


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


# --- backends ---------------------------------------------------------------------------------


def parse_backend_spec(spec: str) -> dict[str, str]:
    """``URL`` or ``URL=name`` (as in ``http://10.0.0.5:8080=gpu1``)."""
    url, sep, name = spec.strip().rpartition("=")
    # In `http://h/x?a=b` the `=` belongs to the query: a name follows only a complete query pair.
    query_pair = url.partition("?")[2].rsplit("&", 1)[-1]
    if not sep or "/" in name or ":" in name or ("?" in url and "=" not in query_pair):
        url, name = spec.strip(), ""
    return {"url": url, "name": name}


def read_backends_file(path: str) -> list[dict[str, str]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([Problem("backends_file", f"cannot read {path}: {exc.strerror}")]) from exc
    specs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            specs.append(parse_backend_spec(line))
    return specs


def default_backend_name(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


# --- validation -------------------------------------------------------------------------------


class _Validator:
    def __init__(self, lines: Mapping[str, int]) -> None:
        self.lines = lines
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        line = self.lines.get(key)
        if line is None and "." in key:
            line = self.lines.get(key.rsplit(".", 1)[0])
        self.problems.append(Problem(key, message, line))

    def build(self, cls: type[Any], raw: Any, key: str) -> Any:
        if not isinstance(raw, Mapping):
            self.problem(key, f"must be a mapping, got {type(raw).__name__}")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name in raw:
            if name not in known:
                self.problem(_join(key, str(name)), f"unknown key (known: {', '.join(known)})")
        values: dict[str, Any] = {}
        for name, spec in known.items():
            sub = _join(key, name)
            if name not in raw:
                if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                    self.problem(sub, "is required")
                continue
            value = self.coerce(hints[name], raw[name], sub, spec.metadata)
            if value is not _INVALID:
                values[name] = value
        try:
            return cls(**values)
        except TypeError:
            return None  # a required field was missing; already reported

    def coerce(self, hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            if value is None and type(None) in args:
                return None
            (hint,) = [a for a in args if a is not type(None)]
            return self.coerce(hint, value, key, meta)
        if origin is tuple:
            items = [value] if isinstance(value, str) and args[0] is str else value
            if not isinstance(items, list | tuple):
                self.problem(key, f"must be a list, got {type(value).__name__}")
                return _INVALID
            coerced = [self.coerce(args[0], v, f"{key}[{i}]", {}) for i, v in enumerate(items)]
            return tuple(c for c in coerced if c is not _INVALID and c is not None)
        if origin in (Mapping, dict):
            if not isinstance(value, Mapping):
                self.problem(key, f"must be a mapping, got {type(value).__name__}")
                return _INVALID
            return {str(k): str(v) for k, v in value.items()}
        if dataclasses.is_dataclass(hint):
            return self.build(typing.cast(type, hint), value, key)
        return self.scalar(hint, value, key, meta)

    def scalar(self, hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
        try:
            if hint is bool:
                coerced: Any = _to_bool(value)
            elif hint is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                coerced = int(value)
            elif hint is float:
                if isinstance(value, bool):
                    raise ValueError
                coerced = float(value)
            else:
                if isinstance(value, dict | list):
                    raise ValueError
                coerced = str(value)
        except (TypeError, ValueError):
            self.problem(key, f"must be {hint.__name__}, got {value!r}")
            return _INVALID
        if "choices" in meta and coerced not in meta["choices"]:
            self.problem(key, f"must be one of {', '.join(meta['choices'])}, got {coerced!r}")
            return _INVALID
        if "min" in meta and coerced < meta["min"]:
            self.problem(key, f"must be at least {meta['min']}, got {coerced!r}")
            return _INVALID
        if "max" in meta and coerced > meta["max"]:
            self.problem(key, f"must be at most {meta['max']}, got {coerced!r}")
            return _INVALID
        return coerced


_INVALID = object()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _normalise_backends(raw: dict[str, Any]) -> None:
    """Backends may be written as strings (``URL[=name]``) anywhere a mapping is accepted."""
    backends = raw.get("backends")
    if backends is None:
        return
    if not isinstance(backends, list):
        backends = [backends]
    raw["backends"] = [parse_backend_spec(b) if isinstance(b, str) else b for b in backends]


def _check_backends(config: Config, v: _Validator) -> Config:
    seen_names: dict[str, int] = {}
    backends = []
    for index, backend in enumerate(config.backends):
        key = f"backends[{index}]"
        parts = urlsplit(backend.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            v.problem(f"{key}.url", f"must be an http(s) URL with a host, got {backend.url!r}")
            continue
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            v.problem(f"{key}.url", f"has an invalid port: {backend.url!r}")
            continue
        name = backend.name or default_backend_name(backend.url)
        if name in seen_names:
            v.problem(f"{key}.name", f"duplicate backend name {name!r} (also backends[{seen_names[name]}])")
            continue
        seen_names[name] = index
        backends.append(dataclasses.replace(backend, name=name, url=backend.url.rstrip("/")))
    return dataclasses.replace(config, backends=tuple(backends))


def _normalise_instances(raw: dict[str, Any]) -> None:
    """An instance's ``command`` may be one string, split as a shell would (but never run by one)."""
    instances = raw.get("instances")
    if not isinstance(instances, list):
        return
    for instance in instances:
        if isinstance(instance, dict) and isinstance(instance.get("command"), str):
            with contextlib.suppress(ValueError):  # an unclosed quote: reported as the string it is
                instance["command"] = shlex.split(instance["command"])


def _names_fleet_source(raw: Mapping[str, Any]) -> bool:
    supervisor = raw.get("supervisor")
    return bool(
        raw.get("backends")
        or raw.get("backends_file")
        or raw.get("server_list")
        or raw.get("instances")
        or (isinstance(supervisor, Mapping) and supervisor.get("commands_file"))
    )


def _resolve_instances(config: Config, v: _Validator, environ: Mapping[str, str]) -> Config:
    """Add the commands file's instances to the YAML's, then give each its URL and name (one port each)."""

    instances = list(config.instances)
    if config.supervisor.commands_file:
        try:
            instances += read_commands_file(config.supervisor.commands_file, environ)
        except ConfigError as exc:
            v.problems.extend(exc.problems)
    resolved, problems = resolve_instances(instances)
    for problem in problems:
        v.problem(problem.key, problem.message)
    return dataclasses.replace(config, instances=resolved)


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
    return sources


def build_config(
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    default_commands_file: str | None = None,
    checks: Iterable[Callable[[Config], Iterable[tuple[str, str]]]] = (),
) -> Config:
    """Merge the layers and validate them once; raises ConfigError listing every problem.

    ``default_commands_file`` (``serve`` passes ``llamafile_commands.txt``) is launched only when no
    fleet source is given at all and the file exists. ``checks`` are the domain's cross-checks of a
    valid configuration (policy names, routes; ``llmbalancer.configure``), each giving ``(key, message)``
    problems reported with the rest: this package knows no domain module.
    """
    environ = os.environ if environ is None else environ
    env = environment_overrides(environ)
    config_file = (overrides or {}).get("config") or env.pop("config", None) or config_file
    env.pop("config", None)
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if config_file:
        raw, lines = load_yaml(str(config_file))
    layered = [env, {k: v for k, v in (overrides or {}).items() if k != "config"}]
    cli_backends: list[Any] = []
    for layer in layered:
        for key, value in layer.items():
            if value is None:
                continue
            if key == "backends":
                cli_backends = list(value)  # a later layer replaces the list, as any other key
                continue
            _set_dotted(raw, key, value)
    _normalise_backends(raw)
    if cli_backends:
        raw["backends"] = [parse_backend_spec(b) for b in cli_backends]
    _normalise_instances(raw)
    normalise_routes(raw)
    if default_commands_file and not _names_fleet_source(raw) and Path(default_commands_file).is_file():
        _set_dotted(raw, "supervisor.commands_file", default_commands_file)

    v = _Validator(lines)
    v.problems.extend(merge_server_list(raw))
    backends_file = raw.get("backends_file")
    if backends_file:
        try:
            raw.setdefault("backends", [])
            raw["backends"] = list(raw["backends"]) + read_backends_file(str(backends_file))
        except ConfigError as exc:
            v.problems.extend(exc.problems)
    config = v.build(Config, raw, "")
    if config is not None:
        config = _check_backends(config, v)
        config = _resolve_instances(config, v, environ)
        if config.policy.hash_key != "client" and not config.policy.hash_key.startswith("header:"):
            v.problem("policy.hash_key", f"must be 'client' or 'header:<Name>', got {config.policy.hash_key!r}")
        for check in checks:
            for key, message in check(config):
                v.problem(key, message)
    if v.problems or config is None:
        raise ConfigError(v.problems or [Problem("", "invalid configuration")])
    return typing.cast(Config, config)
