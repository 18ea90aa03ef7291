"""Configuration: the schema (pydantic models, frozen: ``schema.py``), loading and layering (YAML with
line numbers, the environment, flags: ``layers.py``), validation into problems by key and line
(``validation.py``), and the fleet formats it imports after that (``fleet.py``: commands file,
``server-list.json``, backends file).

Owns: every key and its default, validation, and error reporting by key and YAML line.
May import: nothing else of llmbalancer (domain cross-checks are passed in: ``llmbalancer.configure``).
"""

from llmbalancer.config.fleet import fleet_sources, read_backends_file
from llmbalancer.config.layers import ENV_KEYS, environment_overrides, load_yaml, without_settings
from llmbalancer.config.loading import build_config
from llmbalancer.config.problems import ConfigError, Problem
from llmbalancer.config.schema import (
    BACKEND_KINDS,
    DEFAULT_COMMANDS_FILE,
    LOG_FORMATS,
    LOG_LEVELS,
    RESTART_MODES,
    AdminConfig,
    AgentsConfig,
    BackendConfig,
    BackendKind,
    CircuitConfig,
    Config,
    DiscoveryConfig,
    DnsTarget,
    GpuConfig,
    HealthConfig,
    InstanceConfig,
    LoggingConfig,
    ModelRoute,
    MonitorConfig,
    PolicyConfig,
    QueueConfig,
    RetryConfig,
    RoutingConfig,
    ServerConfig,
    StateConfig,
    SupervisorConfig,
    TimeoutsConfig,
    default_backend_name,
    http_url,
    masked_url,
    parse_backend_spec,
)

__all__ = [
    "BACKEND_KINDS",
    "DEFAULT_COMMANDS_FILE",
    "ENV_KEYS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "RESTART_MODES",
    "AdminConfig",
    "AgentsConfig",
    "BackendConfig",
    "BackendKind",
    "CircuitConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "DnsTarget",
    "GpuConfig",
    "HealthConfig",
    "InstanceConfig",
    "LoggingConfig",
    "ModelRoute",
    "MonitorConfig",
    "PolicyConfig",
    "Problem",
    "QueueConfig",
    "RetryConfig",
    "RoutingConfig",
    "ServerConfig",
    "StateConfig",
    "SupervisorConfig",
    "TimeoutsConfig",
    "build_config",
    "default_backend_name",
    "environment_overrides",
    "fleet_sources",
    "http_url",
    "load_yaml",
    "masked_url",
    "parse_backend_spec",
    "read_backends_file",
    "without_settings",
]
