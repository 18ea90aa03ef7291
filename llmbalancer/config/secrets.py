"""The secrets the configuration names indirectly, resolved once, here at the edge: the keys file (read at
start-up and at every reload, as the backends file is), ``auth.keys[].key_env`` and
``backends[].api_key_env`` read from the environment; key names checked unique."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import SecretStr, ValidationError

from llmbalancer.config.keys import KeyConfig
from llmbalancer.config.problems import Problem
from llmbalancer.config.schema import Config
from llmbalancer.config.validation import dotted, message

KEYS_FILE = "auth.keys_file"


def resolve_secrets(config: Config, environ: Mapping[str, str]) -> tuple[Config, list[Problem]]:
    """``config`` with the keys file's keys added after ``auth.keys``, every ``key_env``
    and ``backends[].api_key_env`` read from ``environ``, and key names checked unique; and the problems."""
    problems: list[Problem] = []
    keys = list(config.auth.keys)
    if config.auth.keys_file:
        keys += _read_keys_file(config.auth.keys_file, problems)
    resolved: list[KeyConfig] = []
    seen: dict[str, int] = {}
    for index, key in enumerate(keys):
        at = f"auth.keys[{index}]" if index < len(config.auth.keys) else KEYS_FILE
        if key.name in seen:
            problems.append(Problem(f"{at}.name" if at != KEYS_FILE else at, f"duplicate key name {key.name!r}"))
            continue
        seen[key.name] = index
        if key.key_env is not None:
            value = environ.get(key.key_env)
            if not value:
                problems.append(Problem(f"{at}.key_env" if at != KEYS_FILE else at,
                                        f"the variable {key.key_env} is not set (key {key.name!r})"))
                continue
            key = key.model_copy(update={"key": SecretStr(value)})
        resolved.append(key)
    backends = []
    for index, backend in enumerate(config.backends):
        variable = backend.api_key_env
        if variable is not None and backend.api_key is None:
            value = environ.get(variable)
            if not value:
                problems.append(Problem(f"backends[{index}].api_key_env", f"the variable {variable} is not set"))
            else:
                backend = backend.model_copy(update={"api_key": SecretStr(value)})
        backends.append(backend)
    auth = config.auth.model_copy(update={"keys": tuple(resolved)})
    return config.model_copy(update={"auth": auth, "backends": tuple(backends)}), problems


def _read_keys_file(path: str, problems: list[Problem]) -> list[KeyConfig]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        problems.append(Problem(KEYS_FILE, f"cannot read {path}: {exc.strerror}"))
        return []
    except yaml.YAMLError as exc:
        problems.append(Problem(KEYS_FILE, f"{path} is not valid YAML: {exc}"))
        return []
    if isinstance(data, Mapping) and set(data) == {"keys"}:
        data = data["keys"]
    if data is None:
        return []
    if not isinstance(data, list):
        problems.append(Problem(KEYS_FILE, f"{path} must hold a list of keys (or a mapping with 'keys')"))
        return []
    keys = []
    for index, item in enumerate(data):
        try:
            keys.append(KeyConfig.model_validate(item))
        except ValidationError as exc:
            for error in exc.errors():
                field_key = dotted(error["loc"])
                where = f"{path} [{index}]{'.' + field_key if field_key else ''}"
                said = message(error, ("auth", "keys", index, *error["loc"]))
                problems.append(Problem(KEYS_FILE, f"{where}: {said}"))
    return keys
