"""The seam between deciding where a request goes (``proxy.Proxy.forward``: claims, retries, outcomes) and
moving its bytes (a leg: aiohttp's client and server, or the lean relay)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Generic, NamedTuple, Protocol, TypeVar

from llmbalancer.fleet.backend import Backend
from llmbalancer.relay.access import Access
from llmbalancer.relay.inbound import InboundBody

R = TypeVar("R")
A = TypeVar("A", bound="Upstream")


class Relayed(NamedTuple, Generic[R]):
    """How relaying a response went: in full, broken off by the backend (why), or left by the client."""

    response: R
    broken: str | None = None
    client_left: bool = False


class Upstream(Protocol):
    """A backend's answer as a leg opened it: its head read, its body still to come."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    def close(self) -> None: ...


class Leg(Protocol[A, R]):
    """One way to reach backends and answer a client: through aiohttp (``_AiohttpLeg``) or the lean relay
    (``lean.LeanLeg``). ``Proxy.forward`` decides which backend, retries and outcomes for both."""

    def open(self, backend: Backend, body: InboundBody, close: bool) -> Awaitable[A]: ...
    def relay(self, upstream: A, access: Access, cut_usage: bool, backend: Backend) -> Awaitable[Relayed[R]]: ...


class AttemptFailed(Exception):
    def __init__(self, reason: str, *, unreachable: bool, body_sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
        self.body_sent = body_sent
