"""Configuration: every key, its type, bounds and default, as frozen pydantic models (the reference for
every key; ``config.example.yaml`` shows them as YAML).

Sources, lowest precedence first: built-in defaults, the YAML file (``--config``), the environment
(``LLMBALANCER_*``), command-line flags (``loading.py``). Unknown keys are errors. Nothing deeper in the
program reads raw dicts or the environment; the models are read by plain attribute access.
"""

from __future__ import annotations

import shlex
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, field_serializer, field_validator, model_validator

from llmbalancer.config.keys import AuthConfig
from llmbalancer.config.section import Count, Names, Number, Seconds, Section

LogFormat = Literal["auto", "console", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
BackendKind = Literal["auto", "llamacpp", "llamafile", "ollama", "openai", "llmbalancer"]
RestartMode = Literal["always", "on-failure", "never"]
LOG_FORMATS: tuple[str, ...] = typing.get_args(LogFormat)
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)
BACKEND_KINDS: tuple[str, ...] = typing.get_args(BackendKind)
RESTART_MODES: tuple[str, ...] = typing.get_args(RestartMode)

# Launched by `serve` when no fleet source is given at all (as the original llamafile balancer did).
DEFAULT_COMMANDS_FILE = "llamafile_commands.txt"


def _windows(value: Any) -> Any:
    if isinstance(value, Mapping):
        for name, seconds in value.items():
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < float("inf"):
                raise ValueError(f"{name!r} must name a number of seconds above 0, got {seconds!r}")
    return value


class ServerConfig(Section):
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 is a choice you make")
    port: Count = Field(8088, ge=0, le=65535, description="port to bind")
    max_body_bytes: Count = Field(16 * 1024 * 1024, ge=1, description="larger request bodies get 413")
    drain_timeout: Seconds = Field(30.0, ge=0, description="seconds in-flight requests may finish after SIGTERM")
    keepalive_timeout: Seconds = Field(
        75.0, ge=0.1, description="seconds an idle kept-alive client connection stays open between requests"
    )
    header_timeout: Seconds = Field(
        60.0, ge=0.1, description="seconds a client has to send a request's head (408 or a close after)"
    )
    body_timeout: Seconds = Field(
        60.0, ge=0.1, description="seconds a request body may make no progress (408); a slow steady upload goes on"
    )
    relay: Literal["lean", "aiohttp"] = Field(
        "lean", description="lean: generation requests relayed socket to socket; aiohttp: every request through aiohttp"
    )
    tls_cert: str | None = Field(None, description="PEM certificate (chain): serve HTTPS; re-read on reload")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class PolicyConfig(Section):
    name: str = Field("slot_aware", description="the routing policy (`sticky:prefix` = sticky wrapping prefix)")
    inner: str | None = Field(None, description="the policy `sticky` wraps (default slot_aware)")
    hash_key: str = Field("client", description="what `hash` hashes: client (the address) or header:<Name>")
    sticky_ttl: Seconds = Field(180.0, ge=0, description="sticky: seconds a session stays pinned after its last use")
    prefix_block_chars: Count = Field(64, ge=8, description="prefix: prompt block size, in characters")
    prefix_min_match_blocks: Count = Field(4, ge=1, description="prefix: shortest shared prefix that beats load")
    prefix_max_imbalance: Count = Field(
        2, ge=0, description="prefix: requests a prefix holder may carry above the least busy and still win"
    )
    prefix_max_blocks: Count = Field(65536, ge=16, description="prefix: per-backend index size (LRU)")
    prefix_max_wait: Seconds = Field(
        1.0, ge=0, description="prefix: longest wait for a full server holding the prompt's prefix; 0 = never wait"
    )
    prefix_protect_histories: bool = Field(
        True, description="prefix: a new chat avoids servers whose chats share its system prompt"
    )
    prefix_speed_aware: bool = Field(
        True, description="prefix: where the prompt costs the same, a longer answer goes to the faster decoder "
        "(decode speed learned per server from timings)",
    )

    @field_validator("hash_key")
    @classmethod
    def _hash_key(cls, value: str) -> str:
        if value != "client" and not value.startswith("header:"):
            raise ValueError(f"must be 'client' or 'header:<Name>', got {value!r}")
        return value


def parse_backend_spec(spec: str) -> dict[str, str]:
    """``URL`` or ``URL=name`` (as in ``http://10.0.0.5:8080=gpu1``)."""
    url, sep, name = spec.strip().rpartition("=")
    # In `http://h/x?a=b` the `=` belongs to the query: a name follows only a complete query pair.
    query_pair = url.partition("?")[2].rsplit("&", 1)[-1]
    if not sep or "/" in name or ":" in name or ("?" in url and "=" not in query_pair):
        url, name = spec.strip(), ""
    return {"url": url, "name": name}


def http_url(url: str) -> str:
    """``url`` without its trailing /, when it is an http(s) URL with a host and a valid port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"has an invalid port: {url!r}") from None
    return url.rstrip("/")


def default_backend_name(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


class BackendConfig(Section):
    """A server already running. Written as a mapping or as the string ``URL[=name]``."""

    url: str = Field(description="http(s) base URL; a trailing / is dropped")
    name: str = Field("", description="default: host:port of the URL")
    kind: BackendKind = Field("auto", description="the server's API; auto: found out by probing")
    max_concurrency: Count | None = Field(None, ge=1, description="cap on requests in flight to it")
    models: Names = Field((), description="models it serves (else discovered)")
    api_key: SecretStr | None = Field(
        None, min_length=1, description="sent as `Authorization: Bearer` on requests and probes (its --api-key)"
    )
    api_key_env: str | None = Field(None, description="an environment variable holding api_key")
    rpm: Count | None = Field(None, ge=1, description="requests per minute it may be sent (fixed windows)")
    tpm: Count | None = Field(None, ge=1, description="tokens (prompt + completion) per minute it may be sent")

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, value: Any) -> Any:
        data = parse_backend_spec(value) if isinstance(value, str) else value
        if isinstance(data, Mapping) and not data.get("name") and isinstance(data.get("url"), str):
            data = {**data, "name": default_backend_name(data["url"].strip())}
        return data

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_url(url)


def _split_command(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return shlex.split(value)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"cannot split the command: {exc}") from None


def _env_values(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: str(v) if isinstance(v, bool | int | float) else v for k, v in value.items()}
    return value


class InstanceConfig(Section):
    """A server the balancer launches, supervises and balances over."""

    command: Annotated[tuple[str, ...], BeforeValidator(_split_command)] = Field(
        description="list, or one string split as a shell would (never run by one); ${VAR} from the environment"
    )
    name: str = Field("", description="default: from --alias/-a, else executable-port")
    url: str = Field("", description="default: from --host/--port in the command")
    env: Annotated[Mapping[str, str], BeforeValidator(_env_values)] = Field(
        default_factory=dict, description="laid over the balancer's environment"
    )
    cwd: str | None = Field(None, description="working directory (default: the balancer's)")
    restart: RestartMode = Field("always", description="when an exited instance is started again")
    ready_timeout: Seconds = Field(
        120.0, ge=0, description="not ready within this many seconds: killed and restarted (0: no limit)"
    )


class SupervisorConfig(Section):
    commands_file: str | None = Field(
        None, description="llamafile_commands.txt format; used by default when no fleet source is given"
    )
    output_dir: str = Field("llamafile_outputs", description="one <name>.log per instance")
    stop_grace: Seconds = Field(10.0, ge=0, description="seconds between SIGTERM and SIGKILL")
    log_max_bytes: Count = Field(10 * 1024 * 1024, ge=1024, description="rotate an instance log at this size")
    log_backups: Count = Field(3, ge=0, description="rotated logs kept (<name>.log.1 .. .N)")
    drain_timeout: Seconds = Field(
        30.0, ge=0, description="admin stop/restart: wait this long for in-flight requests before signalling"
    )
    restart_backoff: Seconds = Field(1.0, ge=0, description="first restart delay after a crash; doubles per crash")
    restart_backoff_max: Seconds = Field(60.0, ge=0, description="the longest restart delay")
    backoff_reset: Seconds = Field(
        30.0, ge=0, description="an instance ready this long starts again from restart_backoff"
    )
    max_restarts: Count = Field(5, ge=0, description="more crashes than this within restart_window: marked failed")
    restart_window: Seconds = Field(300.0, ge=0, description="seconds over which crashes are counted")


class TimeoutsConfig(Section):
    connect: Seconds = Field(5.0, ge=0.001, description="TCP connect to a backend")
    first_byte: Seconds = Field(300.0, ge=0.001, description="until the backend's first response byte")
    idle: Seconds = Field(120.0, ge=0.001, description="longest gap between two chunks of a response")
    health: Seconds = Field(2.0, ge=0.001, description="one health probe")


class RetryConfig(Section):
    attempts: Count = Field(3, ge=1, description="backends tried per request before 502")


class HealthConfig(Section):
    interval: Seconds = Field(1.0, ge=0.05, description="seconds between probes of a routable backend")
    window: Seconds = Field(5.0, ge=0, description="sliding window for judging state")


class CircuitConfig(Section):
    """Passive health (fleet/circuit.py): eject a backend whose requests keep failing."""

    failures: Count = Field(3, ge=1, description="consecutive failures that open the circuit")
    cooldown: Seconds = Field(5.0, ge=0, description="seconds before one probe request may try it; doubles")
    cooldown_max: Seconds = Field(60.0, ge=0, description="the longest cooldown")


class QueueConfig(Section):
    """The admission queue: requests wait here, per model, while every eligible backend is full."""

    max_size: Count = Field(
        10_000, ge=0,
        description="a cap on waiters per model (503 with Retry-After beyond it); a memory bound by default, "
        "set it lower to shed load early. Whatever it is, a request whose expected wait exceeds timeout is refused",
    )
    timeout: Seconds = Field(
        30.0, ge=0, description="seconds a request may wait for a slot: then 504; one expected to wait longer: 503"
    )
    bind_window: Count = Field(
        16, ge=1, description="when a slot frees, the policy chooses among this many waiting requests from the "
        "head (prefix: the one whose prompt that server holds best); 1 = strictly first come, first served",
    )
    server_backlog: Count = Field(
        0, ge=0, description="while requests wait here, let each server also hold one request in its own queue "
        "per this many slots (started the moment a slot frees there, bound early); 0 = never (bind late)",
    )
    max_pass_over: Seconds = Field(
        2.0, ge=0, description="ageing: a request waiting this long beyond the wait expected for it in "
        "first-come-first-served order is served first",
    )
    wait_for_backends: bool | None = Field(
        None,
        description="a request that finds no backend able to take it (none healthy or starting) waits, up to"
        " timeout, for one to register instead of 503 at once; default: true when discovery.dns is set",
    )


class AdminConfig(Section):
    token: SecretStr | None = Field(
        None,
        min_length=1,
        description="set: every /admin/* route requires `Authorization: Bearer <token>`, from any address;"
        " unset: admin routes answer loopback clients only",
    )


class AgentsConfig(Section):
    ttl: Seconds = Field(3.0, gt=0, description="an agent's backend with no heartbeat for this long is removed")


class DnsTarget(Section):
    """A DNS name whose addresses are backends (a Kubernetes headless service: one per ready pod)."""

    name: str = Field(description="resolved for A and AAAA records every interval")
    port: Count = Field(ge=1, le=65535, description="the port every address found serves on")
    interval: Seconds = Field(5.0, ge=0.1, description="seconds between resolutions")
    kind: BackendKind = Field("auto", description="the servers' API, as a backend's kind")


class DiscoveryConfig(Section):
    dns: tuple[DnsTarget, ...] = Field((), description="names whose addresses are added and removed as they change")
    nameservers: Names = Field(
        (), description="DNS servers to ask, as IP or IP:port (default: the system's, /etc/resolv.conf)"
    )


_STATE_SCHEMES = ("redis", "rediss", "unix")


def masked_url(url: str | None) -> str | None:
    """``url`` with its password (if any) replaced by ``***``: what may be printed or shown."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


class StateConfig(Section):
    """Replicas sharing one fleet through Redis (README "Several replicas"). No ``url``: one process, in memory."""

    url: str | None = Field(
        None,
        description="redis://[:password@]host:port/db (rediss:// for TLS, unix:///path.sock); replicas given the same"
        " url and prefix share backends, slots in flight, sticky pins, prefix placements and counters",
    )
    prefix: str = Field("llmb", min_length=1, max_length=100, description="the keys' prefix: one per deployment")
    timeout: Seconds = Field(
        0.05, gt=0, le=10,
        description="seconds each Redis call may take; beyond it the replica serves from its own state until"
        " Redis answers again",
    )
    heartbeat: Seconds = Field(1.0, gt=0, description="seconds between heartbeats: own counts written, others' read")
    lease: Seconds = Field(
        3.0, gt=0, description="a replica silent this long is gone: its requests in flight no longer count"
    )
    replica: str | None = Field(
        None, min_length=1, max_length=200, description="this replica's name (default: host:port and a random suffix)"
    )
    address: str | None = Field(
        None, description="where people reach this replica, shown by the others (default: http://host:port)"
    )
    memory_entries: Count = Field(
        100_000, ge=100,
        description="recent events kept in Redis (pins, placements) for a replica that starts or reconnects",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in _STATE_SCHEMES:
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {masked_url(url)!r}")
        return url

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> StateConfig:
        if self.lease <= self.heartbeat:
            raise ValueError(f"lease ({self.lease:g} s) must be longer than heartbeat ({self.heartbeat:g} s)")
        return self

    @field_serializer("url")
    def _masked(self, url: str | None) -> str | None:
        return masked_url(url)


class LoggingConfig(Section):
    format: LogFormat = Field("auto", description="auto: console on a terminal, else JSON lines")
    level: LogLevel = Field("info")


class GpuConfig(Section):
    busy_threshold: Number = Field(
        50.0, ge=0, le=100, description="/llmhealth says busy when the highest utilisation reaches this percentage"
    )
    interval: Seconds = Field(1.0, ge=0.05, description="seconds between samples")
    window: Seconds = Field(5.0, ge=0.05, description="seconds of samples kept (and judged)")


class MonitorConfig(Section):
    recent_requests: Count = Field(50, ge=0, description="finished requests kept for the snapshot and monitor page")


class ModelRoute(Section):
    """Requests whose model matches ``pattern`` in full go to ``backends`` (scheduling/model_routing.py)."""

    pattern: str = Field(description="a regular expression, matched in full")
    backends: Names = Field((), description="empty: every backend that serves the model (a route setting only race)")
    race: Count = Field(1, ge=1, description="send each request to this many backends at once, keep the first")

    def __init__(self, pattern: str, backends: tuple[str, ...] = (), race: int = 1, **extra: Any) -> None:
        # Positional, as the dataclass it was: ModelRoute("smol.*", ("a",), 2).
        fields: dict[str, Any] = {"pattern": pattern, "backends": backends, "race": race}
        super().__init__(**fields, **extra)


class RoutingConfig(Section):
    models: tuple[ModelRoute, ...] = Field(
        (), description="ordered, first full match wins; in YAML a mapping `pattern: [backend, ...]`"
    )
    fallback: str | None = Field(None, description="the backend for a model no route matches")
    strict_models: bool = Field(
        False, description="refuse a model no backend names even when the fleet serves one model only"
    )


class BatchConfig(Section):
    """OpenAI's Files and Batches API (``llmbalancer/batches/``): batch lines run on slots interactive users
    leave idle, durably (SQLite and files under ``dir``)."""

    enabled: bool = Field(True, description="serve /v1/files and /v1/batches (false: those paths are proxied)")
    dir: str = Field("llmbalancer-data", description="where files and batch state live; created at the first upload")
    max_file_bytes: Count = Field(200 * 1024 * 1024, ge=1, description="larger uploads get 413")
    max_lines: Count = Field(50_000, ge=1, description="requests one batch's input file may hold")
    max_in_flight: Count | None = Field(
        None, ge=1,
        description="batch lines in flight per backend; null: all but one of its slots (never its last free one)",
    )
    max_attempts: Count = Field(3, ge=1, description="backends a line is tried on before it goes to the error file")
    completion_windows: Annotated[Mapping[str, Seconds], BeforeValidator(_windows)] = Field(
        default_factory=lambda: {"24h": 86400.0},
        description="completion_window values a batch may ask for, in seconds",
    )


class Config(Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    backends: tuple[BackendConfig, ...] = Field((), description="servers already running")
    backends_file: str | None = Field(None, description="a file with one URL[=name] per line, # comments")
    instances: tuple[InstanceConfig, ...] = Field((), description="servers the balancer launches")
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    agents: AgentsConfig = Field(default_factory=AgentsConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    server_list: str | None = Field(
        None, description="llama-balancer's server-list.json, imported as backends and routes"
    )

    @field_validator("backends", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Mapping) else value

    @property
    def waits_for_backends(self) -> bool:
        """``queue.wait_for_backends`` as it applies: unset means on exactly when DNS discovery is configured."""
        wait = self.queue.wait_for_backends
        return bool(self.discovery.dns) if wait is None else wait

    def as_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values (tuples as lists; the admin token masked), for ``check-config``."""
        return self.model_dump(mode="json")
