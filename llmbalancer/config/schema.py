"""Configuration: parsed and validated once, at the edge, into frozen dataclasses.

Sources, lowest precedence first: built-in defaults, the YAML file (``--config``), the environment
(``LLMBALANCER_*``), command-line flags. Every problem found is collected and reported together as
``ConfigError``, each naming its key (and YAML line where known). Nothing deeper in the program
reads raw dicts or the environment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
    # The client's side of a connection: idle time between requests on a kept-alive connection; a
    # request head (request line and headers) not complete within header_timeout, and a body that
    # makes no progress for body_timeout, get 408.
    keepalive_timeout: float = field(default=75.0, metadata=_at_least(0.1))
    header_timeout: float = field(default=60.0, metadata=_at_least(0.1))
    body_timeout: float = field(default=60.0, metadata=_at_least(0.1))


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
