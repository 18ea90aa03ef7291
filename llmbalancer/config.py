"""Configuration: parsed and validated once, at the edge, into frozen dataclasses.

Sources, lowest precedence first: built-in defaults, the YAML file (``--config``), the environment
(``LLMBALANCER_*``), command-line flags. Every problem found is collected and reported together as
``ConfigError``, each naming its key (and YAML line where known). Nothing deeper in the program
reads raw dicts or the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKEND_KINDS = ("auto", "llamacpp", "llamafile", "ollama", "openai", "llmbalancer")
RESTART_MODES = ("always", "on-failure", "never")


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


def _at_least(minimum: float) -> dict[str, Any]:
    return {"min": minimum}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8088, metadata={"min": 0, "max": 65535})
    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata=_at_least(1))
    drain_timeout: float = field(default=30.0, metadata=_at_least(0))


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "slot_aware"
    inner: str | None = None
    # What `hash` hashes: "client" (the client address) or "header:<Name>".
    hash_key: str = "client"
    # `sticky`: how long a session stays pinned to its backend after its last request.
    sticky_ttl: float = field(default=180.0, metadata=_at_least(0))
    # `prefix`: see llmbalancer/selectors/prefix.py for what each does.
    prefix_block_chars: int = field(default=64, metadata=_at_least(8))
    prefix_min_match_blocks: int = field(default=4, metadata=_at_least(1))
    prefix_max_imbalance: int = field(default=2, metadata=_at_least(0))
    prefix_max_blocks: int = field(default=65536, metadata=_at_least(16))
    prefix_max_wait: float = field(default=1.0, metadata=_at_least(0))
    prefix_protect_histories: bool = True


@dataclass(frozen=True)
class BackendConfig:
    url: str
    name: str = ""
    kind: str = field(default="auto", metadata=_choices(*BACKEND_KINDS))
    max_concurrency: int | None = field(default=None, metadata=_at_least(1))
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstanceConfig:
    command: tuple[str, ...]
    name: str = ""
    url: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    restart: str = field(default="always", metadata=_choices(*RESTART_MODES))
    ready_timeout: float = field(default=120.0, metadata=_at_least(0))


# Launched by `serve` when no fleet source is given at all (as the original llamafile balancer did).
DEFAULT_COMMANDS_FILE = "llamafile_commands.txt"


@dataclass(frozen=True)
class SupervisorConfig:
    commands_file: str | None = None
    output_dir: str = "llamafile_outputs"
    stop_grace: float = field(default=10.0, metadata=_at_least(0))
    log_max_bytes: int = field(default=10 * 1024 * 1024, metadata=_at_least(1024))
    log_backups: int = field(default=3, metadata=_at_least(0))
    # Admin stop/restart: how long to wait for an instance's in-flight requests before signalling it.
    drain_timeout: float = field(default=30.0, metadata=_at_least(0))
    # Restart delay: `restart_backoff` seconds, doubling per crash up to `restart_backoff_max`; back to
    # the start once an instance has stayed ready for `backoff_reset` seconds.
    restart_backoff: float = field(default=1.0, metadata=_at_least(0))
    restart_backoff_max: float = field(default=60.0, metadata=_at_least(0))
    backoff_reset: float = field(default=30.0, metadata=_at_least(0))
    # More than `max_restarts` crashes within `restart_window` seconds: the instance is marked failed.
    max_restarts: int = field(default=5, metadata=_at_least(0))
    restart_window: float = field(default=300.0, metadata=_at_least(0))


@dataclass(frozen=True)
class TimeoutsConfig:
    connect: float = field(default=5.0, metadata=_at_least(0.001))
    first_byte: float = field(default=300.0, metadata=_at_least(0.001))
    idle: float = field(default=120.0, metadata=_at_least(0.001))
    health: float = field(default=2.0, metadata=_at_least(0.001))


@dataclass(frozen=True)
class RetryConfig:
    attempts: int = field(default=3, metadata=_at_least(1))


@dataclass(frozen=True)
class HealthConfig:
    interval: float = field(default=1.0, metadata=_at_least(0.05))
    window: float = field(default=5.0, metadata=_at_least(0))


@dataclass(frozen=True)
class CircuitConfig:
    """Passive health (llmbalancer/circuit.py): eject a backend whose requests keep failing."""

    failures: int = field(default=3, metadata=_at_least(1))
    cooldown: float = field(default=5.0, metadata=_at_least(0))
    cooldown_max: float = field(default=60.0, metadata=_at_least(0))


@dataclass(frozen=True)
class QueueConfig:
    """The admission queue: requests wait here, per model, while every eligible backend is full."""

    max_size: int = field(default=100, metadata=_at_least(0))
    timeout: float = field(default=30.0, metadata=_at_least(0))


@dataclass(frozen=True)
class LoggingConfig:
    format: str = field(default="auto", metadata=_choices(*LOG_FORMATS))
    level: str = field(default="info", metadata=_choices(*LOG_LEVELS))


@dataclass(frozen=True)
class GpuConfig:
    # /llmhealth says busy when the highest GPU utilisation over `window` reaches this percentage.
    busy_threshold: float = field(default=50.0, metadata={"min": 0, "max": 100})
    interval: float = field(default=1.0, metadata=_at_least(0.05))
    window: float = field(default=5.0, metadata=_at_least(0.05))


@dataclass(frozen=True)
class MonitorConfig:
    # Finished requests kept for the snapshot and the monitor page.
    recent_requests: int = field(default=50, metadata=_at_least(0))


@dataclass(frozen=True)
class ModelRoute:
    """Requests whose model matches ``pattern`` in full go to ``backends`` (see model_routing.py)."""

    pattern: str
    # Empty: every backend that serves the model (a route that only sets `race`).
    backends: tuple[str, ...] = ()
    # Send each request to this many backends at once and keep the first to answer (racing.py).
    race: int = field(default=1, metadata=_at_least(1))


@dataclass(frozen=True)
class RoutingConfig:
    # Ordered, first full match wins; written in YAML as a mapping `pattern: [backend, ...]`.
    models: tuple[ModelRoute, ...] = ()
    # The backend for a model that no route matches and no backend is known to serve.
    fallback: str | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    backends: tuple[BackendConfig, ...] = ()
    backends_file: str | None = None
    instances: tuple[InstanceConfig, ...] = ()
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # llama-balancer's server-list.json, imported as backends and routes (llmbalancer/server_list.py).
    server_list: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.key or '<root>'}{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


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
    from llmbalancer.commands_file import read_commands_file, resolve_instances  # late: it imports this module

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
) -> Config:
    """Merge the layers and validate them once; raises ConfigError listing every problem.

    ``default_commands_file`` (``serve`` passes ``llamafile_commands.txt``) is launched only when no
    fleet source is given at all and the file exists.
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
    from llmbalancer.server_list import merge_server_list, normalise_routes  # late: they import config

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
        from llmbalancer.selectors import policy_problems  # late: selectors import backend types

        for key, message in policy_problems(config.policy):
            v.problem(key, message)
        from llmbalancer.model_routing import routing_problems

        for key, message in routing_problems(config):
            v.problem(key, message)
    if v.problems or config is None:
        raise ConfigError(v.problems or [Problem("", "invalid configuration")])
    return typing.cast(Config, config)
