"""What the relay does differently for a kind of backend because of how that kind behaves (measured)."""

from __future__ import annotations

from llmbalancer.fleet.backend import Backend


def drops_connections_reused_after_a_stream(backend: Backend) -> bool:
    """llama.cpp's server (measured on the llama-server of llama-cpp-python 0.3.36) drops a kept-alive
    connection when the next request arrives within a few milliseconds of the end of a *streamed* response:
    2 of 30 back-to-back reuses answered nothing ("Server disconnected"), none with a 10 ms gap, none after
    a non-streamed response. A balancer hands a just-freed slot's connection to the next queued request at
    once, so under load that race is the common case; streamed requests to these servers are therefore
    sent with ``Connection: close`` (a connect per stream, and no idle connection holding one of the
    server's few HTTP threads, ``--threads-http``, for its 5 s keep-alive)."""
    kind = backend.kind
    return kind in ("llamacpp", "llamafile") or (kind == "auto" and backend.health.detected_kind is None)
