"""The configuration as the daemon uses it: validated by ``llmbalancer.config``, then cross-checked
against the domain (policy names, route patterns and the backends routes name).

``config`` imports no domain module, so these checks are handed to it from here; ``serve``,
``check-config`` and a reload all load through ``load_config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmbalancer.config import Config, build_config
from llmbalancer.scheduling.model_routing import routing_problems
from llmbalancer.scheduling.selectors import policy_problems


def _policy(config: Config) -> list[tuple[str, str]]:
    return policy_problems(config.policy)


CHECKS = (_policy, routing_problems)


def load_config(
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    default_commands_file: str | None = None,
    check_executables: bool = False,
) -> Config:
    """``build_config`` with the domain's cross-checks; raises ``ConfigError`` listing every problem.
    ``check_executables`` (``check-config``): an instance whose executable is missing is one too."""
    return build_config(
        config_file=config_file,
        environ=environ,
        overrides=overrides,
        default_commands_file=default_commands_file,
        checks=CHECKS,
        check_executables=check_executables,
    )
