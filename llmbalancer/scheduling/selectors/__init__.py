"""Routing policies, one file each, named in one registry that also feeds the CLI's choices."""

from __future__ import annotations

from collections.abc import Callable

from llmbalancer.config import PolicyConfig
from llmbalancer.scheduling.selectors.base import Hold, Memory, MemorySink, RequestFacts, Selector, Waiting
from llmbalancer.scheduling.selectors.hash import Hash
from llmbalancer.scheduling.selectors.least_connections import LeastConnections
from llmbalancer.scheduling.selectors.power_of_two import PowerOfTwo
from llmbalancer.scheduling.selectors.prefix import Prefix
from llmbalancer.scheduling.selectors.random import Random
from llmbalancer.scheduling.selectors.round_robin import RoundRobin
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from llmbalancer.scheduling.selectors.sticky import Sticky

__all__ = [
    "POLICIES", "Hold", "Memory", "MemorySink", "RequestFacts", "Selector", "Waiting", "make_selector",
    "policy_problems",
]

STICKY_DEFAULT_INNER = "slot_aware"


def _prefix(config: PolicyConfig) -> Selector:
    return Prefix(
        block_chars=config.prefix_block_chars,
        min_match_blocks=config.prefix_min_match_blocks,
        max_imbalance=config.prefix_max_imbalance,
        max_blocks=config.prefix_max_blocks,
        max_wait=config.prefix_max_wait,
        protect_histories=config.prefix_protect_histories,
        speed_aware=config.prefix_speed_aware,
    )


def _sticky(config: PolicyConfig) -> Selector:
    _, inner = _split(config)
    return Sticky(POLICIES[inner or STICKY_DEFAULT_INNER](config), ttl=config.sticky_ttl)


POLICIES: dict[str, Callable[[PolicyConfig], Selector]] = {
    "round_robin": lambda config: RoundRobin(),
    "random": lambda config: Random(),
    "hash": lambda config: Hash(config.hash_key),
    "least_connections": lambda config: LeastConnections(),
    "power_of_two": lambda config: PowerOfTwo(),
    "slot_aware": lambda config: SlotAware(),
    "prefix": _prefix,
    "sticky": _sticky,
}


def _split(config: PolicyConfig) -> tuple[str, str | None]:
    """``sticky:prefix`` (the CLI form) is ``name: sticky, inner: prefix``."""
    name, _, inner = config.name.partition(":")
    return name, inner or config.inner


def policy_problems(config: PolicyConfig) -> list[tuple[str, str]]:
    problems = []
    name, inner = _split(config)
    if name not in POLICIES:
        problems.append(("policy.name", f"unknown policy {name!r} (known: {', '.join(POLICIES)})"))
    if inner is not None:
        if inner not in POLICIES or inner == "sticky":
            problems.append(("policy.inner", f"unknown inner policy {inner!r} (known: {', '.join(POLICIES)})"))
        elif name != "sticky":
            problems.append(("policy.inner", f"only 'sticky' wraps another policy, not {name!r}"))
    return problems


def make_selector(config: PolicyConfig) -> Selector:
    return POLICIES[_split(config)[0]](config)
