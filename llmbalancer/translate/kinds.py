"""Which API a backend speaks, as far as translation cares: Ollama's own, llama.cpp's (the OpenAI API with
llama.cpp's extra sampling parameters, ``timings`` and ``/props``), or the plain OpenAI API."""

from __future__ import annotations

from typing import Literal

from llmbalancer.fleet.backend import Backend

Family = Literal["ollama", "llamacpp", "openai"]


def family_of(backend: Backend) -> Family:
    """``ollama``: forward Ollama requests as they are (Ollama itself, or another balancer, which speaks
    Ollama's API in front of its own fleet); ``llamacpp``: llama.cpp and llamafile (an ``auto`` backend
    until the poller finds it is something else); ``openai``: any other OpenAI-compatible server."""
    kind = backend.kind
    if kind == "auto":
        kind = backend.health.detected_kind or "llamacpp"
    if kind in ("ollama", "llmbalancer"):
        return "ollama"
    if kind == "openai":
        return "openai"
    return "llamacpp"


def speaks_ollama(backend: Backend) -> bool:
    return family_of(backend) == "ollama"
