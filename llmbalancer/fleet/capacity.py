"""How many more requests a backend can take now: the one capacity gate every policy shares.

Capacity is ``max_concurrency`` when configured, else the slot count the poller read (llama.cpp
``/slots``, llamafile's ``slots_idle + slots_processing``), else unknown (no gate). Busy is this
balancer's in-flight claims, which move at once on claim and release, plus those of the other replicas
sharing its state (``in_flight_elsewhere``, as last heard), plus the slots other clients held at the last
poll. So free = polled free slots minus what we dispatched since, and it rises the moment one of our
requests finishes, without waiting for the next poll.
"""

from __future__ import annotations

from llmbalancer.fleet.backend import Backend


def capacity(backend: Backend) -> int | None:
    if backend.max_concurrency is not None:
        return backend.max_concurrency
    return backend.health.slots_total


def free_slots(backend: Backend) -> int | None:
    """Slots free for a new request, or None when the backend's capacity is unknown."""
    total = capacity(backend)
    if total is None:
        return None
    return max(0, total - backend.traffic.in_flight - backend.in_flight_elsewhere - backend.health.slots_external)


def has_room(backend: Backend) -> bool:
    free = free_slots(backend)
    return free is None or free > 0


def busy(backend: Backend) -> int:
    """Slots in use: this balancer's in-flight requests, its other replicas', and other clients' at the last poll."""
    return backend.traffic.in_flight + backend.in_flight_elsewhere + backend.health.slots_external


def load(backend: Backend) -> float:
    """Fraction of capacity in use (in-flight count when capacity is unknown), for comparing backends."""
    total = capacity(backend)
    used = busy(backend)
    return used / total if total else float(used)
