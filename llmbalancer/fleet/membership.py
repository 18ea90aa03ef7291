"""What a source says the fleet holds, turned into the registry's ``add``, ``update`` and ``remove``.

Every source that names backends describes them as ``BackendSpec`` s: the configuration (at start-up and
at each reload), the admin API (one at a time, or its whole list), DNS discovery (the addresses of a
name), agents (one at a time). ``register`` adds one or brings it up to date; ``converge`` makes the
backends a source owns exactly a list, in one step: adds and updates first (requests waiting in the
admission queue then have somewhere to go), then drains. A name that another source owns is a
``Conflict``, found before anything changes, so nothing is ever half-applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from llmbalancer.config import BackendConfig
from llmbalancer.fleet.backend import Backend, BackendSpec
from llmbalancer.fleet.registry import Registry

Owned = Callable[[Backend], bool]


class Change(NamedTuple):
    action: str  # "added", "updated", "removed" or "unchanged"
    name: str
    fields: tuple[str, ...] = ()  # what an update changed ("revived": it was draining and is taken back)

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {"action": self.action, "backend": self.name}
        if self.fields:
            described["changed"] = list(self.fields)
        return described


class Conflict(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def spec_of(config: BackendConfig) -> BackendSpec:
    api_key = config.api_key.get_secret_value() if config.api_key is not None else None
    return BackendSpec(
        config.name, config.url, config.kind, config.max_concurrency, config.models, api_key, config.rpm, config.tpm
    )


def register(registry: Registry, spec: BackendSpec, source: str, *, same_url: bool = False) -> Change:
    """Add ``spec`` as a backend of ``source``, or bring the one registered under its name up to date.
    ``same_url``: a registered one with another URL is a ``Conflict`` (one server per name), not an update."""
    current = registry.get(spec.name)
    if current is None:
        registry.add(Backend.of(spec, source))
        return Change("added", spec.name)
    if current.source != source:
        raise Conflict(spec.name, f"backend {spec.name!r} is registered by {current.source}, not {source}")
    if same_url and current.url != spec.url:
        raise Conflict(spec.name, f"backend {spec.name!r} is registered with another URL ({current.url})")
    changed = registry.update(spec.name, spec)
    return Change("updated", spec.name, tuple(changed)) if changed else Change("unchanged", spec.name)


def conflicts(
    registry: Registry, source: str, specs: Iterable[BackendSpec], owned: Owned | None = None
) -> list[Conflict]:
    """The specs whose name a backend of another source (or outside ``owned``) holds."""
    mine = owned or _of(source)
    found = []
    for spec in specs:
        current = registry.get(spec.name)
        if current is not None and not (current.source == source and mine(current)):
            found.append(Conflict(spec.name, f"backend {spec.name!r} is registered by {current.source}"))
    return found


def converge(
    registry: Registry, source: str, specs: Sequence[BackendSpec], *, owned: Owned | None = None,
    reason: str = "no longer listed",
) -> list[Change]:
    """Make the backends ``owned`` (default: every backend of ``source``) exactly ``specs``; raises the first
    ``Conflict`` before changing anything. Returns every change, unchanged ones included."""
    mine = owned or _of(source)
    found = conflicts(registry, source, specs, mine)
    if found:
        raise found[0]
    changes = [register(registry, spec, source) for spec in specs]
    wanted = {spec.name for spec in specs}
    for backend in list(registry):
        if mine(backend) and backend.name not in wanted and not registry.leaving(backend.name):
            registry.remove(backend.name, reason)
            changes.append(Change("removed", backend.name))
    return changes


def _of(source: str) -> Owned:
    return lambda backend: backend.source == source
