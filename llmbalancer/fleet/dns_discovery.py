"""Service: backends found by DNS (``discovery.dns``).

Every ``interval`` each name is resolved for A and AAAA records (a Kubernetes headless service answers
with one record per ready pod), through ``aiodns`` at ``discovery.nameservers`` (default: the system's
resolver configuration). The addresses found are that name's backends (``http://ADDRESS:PORT``, named
``ADDRESS:PORT``, source ``dns``), made so by ``membership.converge``: new ones are added (*starting*
until a probe says ready), vanished ones drained and removed. A name that does not exist or has no
address records is an empty set (a service scaled to zero). A resolver failure (no answer, a refusal, a
server failure, on either query) keeps the last known set and is logged once, until the name resolves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable, Sequence

import structlog

from llmbalancer.config import DiscoveryConfig, DnsTarget
from llmbalancer.fleet.backend import BackendSpec
from llmbalancer.fleet.membership import Owned, conflicts, converge
from llmbalancer.fleet.registry import Registry

log = structlog.get_logger("llmbalancer.fleet.dns_discovery")

SOURCE = "dns"
# c-ares: the name does not exist (NXDOMAIN), or has no record of the type asked (NODATA): an answer.
_ARES_ENODATA = 1
_ARES_ENOTFOUND = 4
_MAX_ADDRESSES = 1024

Key = tuple[str, int]


class ResolveError(Exception):
    pass


def specs_for(target: DnsTarget, addresses: Iterable[str]) -> list[BackendSpec]:
    specs = []
    for address in sorted(set(addresses))[:_MAX_ADDRESSES]:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        specs.append(BackendSpec(f"{host}:{target.port}", f"http://{host}:{target.port}", target.kind))
    return specs


class DnsDiscovery:
    name = "dns-discovery"

    def __init__(self, registry: Registry, config: DiscoveryConfig) -> None:
        self._registry = registry
        self._config = config
        self._owned: dict[Key, set[str]] = {}  # the backends each name's addresses made
        self._conflicts: set[str] = set()  # names logged as held by another source (once each)
        self._changed = asyncio.Event()

    def configure(self, config: DiscoveryConfig) -> None:
        """New targets or nameservers (a reload): resolving starts over with them at once."""
        if config != self._config:
            self._config = config
            self._changed.set()

    async def run(self) -> None:
        while True:
            config = self._config
            self._changed.clear()
            self._release(unlisted_in=config.dns)
            tasks = [asyncio.create_task(self._follow(config, t), name=f"dns:{t.name}") for t in config.dns]
            try:
                await self._changed.wait()
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _follow(self, config: DiscoveryConfig, target: DnsTarget) -> None:
        failing = False
        while True:
            try:
                addresses = await resolve(target.name, config.nameservers)
            except ResolveError as exc:
                if not failing:
                    kept = len(self._owned.get((target.name, target.port), ()))
                    log.warning("dns_resolve_failed", name=target.name, error=str(exc), kept_backends=kept)
                failing = True
            else:
                if failing:
                    log.info("dns_resolved_again", name=target.name, addresses=len(addresses))
                failing = False
                try:
                    self.apply(target, addresses)
                except Exception:  # a bug of ours must not end discovery for good: logged, tried again next round
                    log.exception("dns_apply_failed", name=target.name)
            await asyncio.sleep(target.interval)

    def apply(self, target: DnsTarget, addresses: Iterable[str]) -> None:
        """Make ``target``'s backends exactly those at ``addresses`` (names another source holds are skipped)."""
        key = (target.name, target.port)
        specs = specs_for(target, addresses)
        owned = self._owned.get(key, set())
        taken = {c.name for c in conflicts(self._registry, SOURCE, specs, self._owner(owned))}
        for name in taken - self._conflicts:
            log.warning("dns_backend_name_taken", name=target.name, backend=name)
        self._conflicts |= taken
        specs = [spec for spec in specs if spec.name not in taken]
        changes = converge(
            self._registry, SOURCE, specs, owned=self._owner(owned), reason=f"no longer in DNS for {target.name}"
        )
        self._owned[key] = {spec.name for spec in specs}
        moved = [change.describe() for change in changes if change.action in ("added", "removed")]
        if moved:
            log.info("dns_changed", name=target.name, changes=moved, backends=len(specs))

    def _release(self, unlisted_in: Iterable[DnsTarget]) -> None:
        """Drain the backends of names no longer configured."""
        listed = {(t.name, t.port) for t in unlisted_in}
        for key in [key for key in self._owned if key not in listed]:
            converge(self._registry, SOURCE, [], owned=self._owner(self._owned.pop(key)),
                     reason=f"{key[0]} no longer configured")

    @staticmethod
    def _owner(names: set[str]) -> Owned:
        return lambda backend: backend.source == SOURCE and backend.name in names


async def resolve(name: str, nameservers: Sequence[str] = ()) -> list[str]:
    """The A and AAAA addresses of ``name``: none when it does not exist or has none; ``ResolveError``
    when either query failed otherwise. Each call asks afresh, with a resolver of its own: c-ares would
    otherwise answer from its cache (a "no AAAA record" kept for the SOA's minimum TTL hides a pod that
    just came up); the interval is the staleness the operator chose."""
    import aiodns  # here: only a balancer that discovers by DNS loads it

    resolver = aiodns.DNSResolver(nameservers=list(nameservers) or None, timeout=2.0, tries=2)
    try:
        addresses: list[str] = []
        for qtype in ("A", "AAAA"):
            try:
                result = await resolver.query_dns(name, qtype)
            except aiodns.error.DNSError as exc:
                code = exc.args[0] if exc.args else None
                if code in (_ARES_ENODATA, _ARES_ENOTFOUND):
                    continue
                raise ResolveError(f"{qtype}: {exc.args[1] if len(exc.args) > 1 else exc}") from None
            addresses += [record.data.addr for record in result.answer if hasattr(record.data, "addr")]
        return addresses
    finally:
        await resolver.close()
