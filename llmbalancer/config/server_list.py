"""llama-balancer's ``server-list.json``, read as is and turned into raw config (backends and routes).

The file, as llama-balancer's README describes it::

    {"servers": {"PC1": {"addr": "http://192.168.1.20", "health-port": 18000, "model-port": 8081,
                         "request-max": 1}, ...},
     "models": {"gpt-oss:20b-64k.*": ["PC1", "PC2"], ...},
     "fallback_server": "PC2"}

Meanings kept: each server is a backend named by its key at ``addr:model-port``; ``request-max``
caps its concurrent requests (``max_concurrency``); ``models`` are ordered full-match regex routes,
first match wins; ``fallback_server`` takes models no route matches. ``health-port`` pointed
llama-balancer at a peer's GPU-load ``/llmhealth``; llmbalancer probes the model port's own
readiness instead, so the value is checked and otherwise unused. A server may also carry its own
``api-key`` (or ``api-key-env``, a variable holding it: llmbalancer's addition, as ``backends[].api_key``),
sent on requests and probes to it. Parsing happens here, once, into
the same raw shape a YAML file gives, so the schema validates both alike (``fleet.py`` merges it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmbalancer.config.problems import Problem

KEY = "server_list"


def normalise_routes(raw: dict[str, Any]) -> None:
    """``routing.models`` may be written as an ordered mapping ``pattern: [backends]`` (as in the JSON)."""
    routing = raw.get("routing")
    if isinstance(routing, dict) and isinstance(routing.get("models"), Mapping):
        routing["models"] = routes_from_mapping(routing["models"])


def routes_from_mapping(models: Mapping[Any, Any]) -> list[dict[str, Any]]:
    """``pattern: [backends]`` (or one name), or ``pattern: {backends: [...], race: N}``."""
    routes = []
    for pattern, value in models.items():
        if isinstance(value, Mapping):
            routes.append({"pattern": str(pattern), **value})
        else:
            routes.append({"pattern": str(pattern), "backends": [value] if isinstance(value, str) else value})
    return routes


class ServerListError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


def read_server_list(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ServerListError([Problem(KEY, f"cannot read {path}: {exc.strerror}")]) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServerListError([Problem(KEY, f"{path} is not valid JSON: {exc}")]) from exc
    return parse_server_list(data)


def parse_server_list(data: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """(backends, routes, fallback) in config's raw shape; every problem found is reported together."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise ServerListError([Problem(KEY, "must hold a JSON object")])
    servers = data.get("servers")
    if not isinstance(servers, dict) or not servers:
        raise ServerListError([Problem(f"{KEY}.servers", "must be a non-empty object of name -> server")])
    backends = []
    for name, server in servers.items():
        key = f"{KEY}.servers.{name}"
        if not isinstance(server, dict):
            problems.append(Problem(key, "must be an object"))
            continue
        addr = server.get("addr")
        port = server.get("model-port")
        if not isinstance(addr, str) or not addr.startswith(("http://", "https://")):
            problems.append(Problem(f"{key}.addr", f"must be a base URL with its scheme, got {addr!r}"))
            continue
        if not _is_port(port):
            problems.append(Problem(f"{key}.model-port", f"must be a port number, got {port!r}"))
            continue
        health_port = server.get("health-port")
        if health_port is not None and not _is_port(health_port):
            problems.append(Problem(f"{key}.health-port", f"must be a port number, got {health_port!r}"))
        backend: dict[str, Any] = {"url": f"{addr.rstrip('/')}:{port}", "name": str(name)}
        request_max = server.get("request-max")
        if request_max is not None:
            if isinstance(request_max, bool) or not isinstance(request_max, int) or request_max < 1:
                problems.append(Problem(f"{key}.request-max", f"must be a positive integer, got {request_max!r}"))
            else:
                backend["max_concurrency"] = request_max
        for field, into in (("api-key", "api_key"), ("api-key-env", "api_key_env")):
            value = server.get(field)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                problems.append(Problem(f"{key}.{field}", "must be a non-empty string"))
            else:
                backend[into] = value
        backends.append(backend)
    models = data.get("models") or {}
    if not isinstance(models, dict):
        problems.append(Problem(f"{KEY}.models", "must be an object of regex -> [server names]"))
        models = {}
    fallback = data.get("fallback_server")
    if fallback is not None and not isinstance(fallback, str):
        problems.append(Problem(f"{KEY}.fallback_server", f"must be a server name, got {fallback!r}"))
        fallback = None
    if problems:
        raise ServerListError(problems)
    # As llama-balancer: without a fallback_server, the first server takes unmatched models.
    return backends, routes_from_mapping(models), fallback or backends[0]["name"]


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536
