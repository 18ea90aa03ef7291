"""Routing policies, one file each, named in one registry that also feeds the CLI's choices."""

from __future__ import annotations

from collections.abc import Callable

from llmbalancer.config import PolicyConfig
from llmbalancer.selectors.base import RequestFacts, Selector
from llmbalancer.selectors.hash import Hash
from llmbalancer.selectors.round_robin import RoundRobin

__all__ = ["POLICIES", "RequestFacts", "Selector", "make_selector", "policy_problems"]

POLICIES: dict[str, Callable[[PolicyConfig], Selector]] = {
    "round_robin": lambda config: RoundRobin(),
    "hash": lambda config: Hash(config.hash_key),
}


def policy_problems(config: PolicyConfig) -> list[tuple[str, str]]:
    problems = []
    if config.name not in POLICIES:
        problems.append(("policy.name", f"unknown policy {config.name!r} (known: {', '.join(POLICIES)})"))
    if config.inner is not None and config.inner not in POLICIES:
        problems.append(("policy.inner", f"unknown policy {config.inner!r} (known: {', '.join(POLICIES)})"))
    return problems


def make_selector(config: PolicyConfig) -> Selector:
    return POLICIES[config.name](config)
