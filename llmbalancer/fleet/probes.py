"""One health probe of one backend: what its own endpoints say about readiness, slots and models.

llama.cpp: ``GET /health`` (200 ready; 503 "Loading model" starting), then ``GET /slots`` for slots
total and processing; when ``/slots`` is disabled (501/404), ``GET /metrics``
(``llamacpp:requests_processing``, ``requests_deferred``) with the slot count from ``/props``
``total_slots``. llamafile's older server puts ``slots_idle`` / ``slots_processing`` in ``/health``.
Ollama: ``GET /api/tags`` (the models it can serve; ``/api/ps`` lists only those loaded now, and
Ollama loads on demand). An ``auto`` backend without ``/health`` that answers ``GET /api/version`` with a
version is Ollama (``Observation.kind``): Ollama requests are forwarded to it as they are, not translated.
OpenAI-compatible or unknown servers without ``/health``: ``GET /v1/models``.
Served models come from ``/v1/models`` (both its OpenAI ``data`` and Ollama-style ``models`` lists).
An ``auto`` backend whose ``/health`` is 404, or 200 without llama.cpp's JSON object (vLLM's is empty),
is noted as a plain OpenAI-compatible server (``Observation.kind``), which the proxy asks for usage.
A backend that is itself a balancer (``kind: llmbalancer``, or recognised by the fields of our own
``/health``) is ready per its ``/health`` and reports its GPU load as ``idle``/``busy`` on
``/llmhealth`` (llama-balancer's contract); that flag feeds selection (idle ones first).
A slow ``/slots`` (llama.cpp answers it between decode steps, late during a long prefill) leaves the
slot figures unknown for that round; it never makes a ready backend unhealthy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import aiohttp

from llmbalancer.fleet.backend import Backend

_METRIC = re.compile(rb"^llamacpp:(requests_processing|requests_deferred)\s+([0-9.eE+-]+)", re.MULTILINE)
# How often (in probes) the served-model list is re-read once known: models change rarely.
_MODELS_EVERY = 30


@dataclass(slots=True)
class Observation:
    ok: bool | None  # True ready, None starting, False failed
    reason: str = ""
    refused: bool = False  # nothing listens: no need to wait for a second failure
    slots_total: int | None = None
    slots_busy: int | None = None
    deferred: int | None = None
    models: tuple[str, ...] | None = None
    gpu_busy: bool | None = None  # a balancer backend's /llmhealth verdict
    kind: str | None = None  # what an "auto" backend turned out to be, when the probe could tell


@dataclass(slots=True)
class ProbeMemory:
    """What a backend's earlier answers taught the poller (which endpoints exist)."""

    slots_endpoint: bool = True
    metrics_endpoint: bool = True
    props_slots: int | None = None
    health_endpoint: bool = True
    ollama: bool = False  # an "auto" backend found to be Ollama
    probes: int = 0


# A probe's answer is read whole, so it is bounded: /slots lists every slot (with its prompt, on some
# versions); nothing a health endpoint says needs more.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# Figures outside these bounds are not believed (NaN, negative, a slot count no server has).
MAX_SLOTS = 65536
MAX_MODELS = 4096
MAX_MODEL_NAME = 512


class _UnreadableAnswer(Exception):
    """The backend answered something a probe cannot use (too large, malformed): a failed probe."""


async def _get(session: aiohttp.ClientSession, backend: Backend, path: str) -> tuple[int, bytes]:
    """GET ``path`` of ``backend``, with its own credentials when it has some (``--api-key`` servers)."""
    url = backend.url + path
    async with session.get(url, headers=backend.auth_headers) as response:
        if (response.content_length or 0) > MAX_ANSWER_BYTES:
            raise _UnreadableAnswer(f"{url.rsplit('/', 1)[-1]} answer of {response.content_length} bytes")
        body = await response.content.read(MAX_ANSWER_BYTES + 1)
        if len(body) > MAX_ANSWER_BYTES:
            raise _UnreadableAnswer(f"/{url.rsplit('/', 1)[-1]} answer over {MAX_ANSWER_BYTES} bytes")
        return response.status, body


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    except RecursionError:
        raise _UnreadableAnswer("JSON nested deeper than anything a server reports") from None


def _number(text: bytes) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def count(value: Any, limit: int = MAX_SLOTS) -> int | None:
    """``value`` as a count when it is a sane one (an int or a finite integral float in 0..limit), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    if isinstance(value, int) and 0 <= value <= limit:
        return value
    return None


def models_of(payload: Any) -> tuple[str, ...]:
    """Model names from ``/v1/models`` (OpenAI ``data[].id``, Ollama-style ``models[].name``) or ``/api/ps``."""
    names: dict[str, None] = {}
    if isinstance(payload, dict):
        for key, field_names in (("data", ("id",)), ("models", ("name", "model"))):
            entries = payload.get(key)
            if not isinstance(entries, list):
                continue
            for entry in entries[:MAX_MODELS]:
                if not isinstance(entry, dict):
                    continue
                name = next((entry[f] for f in field_names if isinstance(entry.get(f), str) and entry[f]), None)
                if name is not None and len(name) <= MAX_MODEL_NAME and len(names) < MAX_MODELS:
                    names[name] = None
    return tuple(names)


async def probe(session: aiohttp.ClientSession, backend: Backend, memory: ProbeMemory) -> Observation:
    memory.probes += 1
    try:
        if backend.kind == "llmbalancer":
            return await _probe_balancer(session, backend, memory)
        if backend.kind == "ollama" or memory.ollama:
            return _detected(await _probe_models(session, backend, "/api/tags"), "ollama" if memory.ollama else None)
        if backend.kind == "openai" or not memory.health_endpoint:
            return _plain_openai(await _probe_models(session, backend, "/v1/models"))
        return await _probe_llamacpp(session, backend, memory)
    except aiohttp.ClientConnectorError as exc:
        return Observation(False, str(exc) or type(exc).__name__, refused=True)
    except TimeoutError:
        return Observation(False, "no answer to the health check in time (timeouts.health)")
    except aiohttp.ClientError as exc:
        return Observation(False, str(exc) or type(exc).__name__)
    except _UnreadableAnswer as exc:
        return Observation(False, f"unreadable health answer: {exc}")
    except Exception as exc:
        return Observation(False, f"unreadable health answer ({type(exc).__name__}: {str(exc)[:200]})")


async def _probe_models(session: aiohttp.ClientSession, backend: Backend, path: str) -> Observation:
    status, body = await _get(session, backend, path)
    if status != 200:
        return Observation(False, f"{path} answered HTTP {status}")
    return Observation(True, models=models_of(_json(body)))


def _detected(seen: Observation, kind: str | None) -> Observation:
    seen.kind = kind
    return seen


async def _answers_ollama_version(session: aiohttp.ClientSession, backend: Backend) -> bool:
    status, body = await _get(session, backend, "/api/version")
    answer = _json(body) if status == 200 else None
    return isinstance(answer, dict) and isinstance(answer.get("version"), str)


def _plain_openai(seen: Observation) -> Observation:
    seen.kind = "openai"  # only the OpenAI API: the proxy asks it for usage (usage_chunk.py)
    return seen


async def _probe_llamacpp(session: aiohttp.ClientSession, backend: Backend, memory: ProbeMemory) -> Observation:
    status, body = await _get(session, backend, "/health")
    if status == 503 and b"loading" in body.lower():
        return Observation(None, "loading model")
    if status == 404 and backend.kind == "auto":
        memory.health_endpoint = False  # not llama.cpp: Ollama, or judge by /v1/models from now on
        if await _answers_ollama_version(session, backend):
            memory.ollama = True
            return _detected(await _probe_models(session, backend, "/api/tags"), "ollama")
        return _plain_openai(await _probe_models(session, backend, "/v1/models"))
    if status != 200:
        return Observation(False, f"/health answered HTTP {status}")
    seen = Observation(True)
    health = _json(body)
    if backend.kind == "auto" and not isinstance(health, dict):
        seen.kind = "openai"  # ready without llama.cpp's {"status": "ok"} (vLLM: an empty body): OpenAI API only
    if isinstance(health, dict) and "backends_total" in health:
        # Another llmbalancer's /health: it speaks Ollama's API too (its own translation included).
        return _detected(await _probe_balancer(session, backend, memory), "llmbalancer")
    idle = count(health.get("slots_idle")) if isinstance(health, dict) else None
    if idle is not None:
        seen.slots_busy = count(health.get("slots_processing")) or 0
        seen.slots_total = count(idle + seen.slots_busy)
    else:
        await _read_slots(session, backend, memory, seen)
    await _read_models(session, backend, memory, seen)
    return seen


async def _probe_balancer(session: aiohttp.ClientSession, backend: Backend, memory: ProbeMemory) -> Observation:
    """Another llmbalancer (or llama-balancer, which may have no ``/health``): ready, and idle or busy."""
    status, _ = await _get(session, backend, "/health")
    if status not in (200, 404):
        return Observation(False, f"/health answered HTTP {status}")
    status, body = await _get(session, backend, "/llmhealth")
    report = _json(body) if status == 200 else None
    if not isinstance(report, dict) or report.get("status") not in ("idle", "busy"):
        return Observation(False, f"/llmhealth answered HTTP {status} without an idle/busy status")
    seen = Observation(True, gpu_busy=report["status"] == "busy")
    await _read_models(session, backend, memory, seen)
    return seen


async def _read_models(
    session: aiohttp.ClientSession, backend: Backend, memory: ProbeMemory, seen: Observation
) -> None:
    if backend.health.served_models and memory.probes % _MODELS_EVERY != 0:
        return
    try:
        status, body = await _get(session, backend, "/v1/models")
        if status == 200:
            seen.models = models_of(_json(body))
    except (aiohttp.ClientError, TimeoutError, _UnreadableAnswer):
        pass  # the model list is a nicety; readiness was already decided


async def _read_slots(
    session: aiohttp.ClientSession, backend: Backend, memory: ProbeMemory, seen: Observation
) -> None:
    try:
        if memory.slots_endpoint:
            status, body = await _get(session, backend, "/slots")
            slots = _json(body) if status == 200 else None
            if isinstance(slots, list) and count(len(slots)):
                seen.slots_total = len(slots)
                seen.slots_busy = sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing") is True)
                return
            if status in (404, 501):
                memory.slots_endpoint = False  # started without --slots; do not ask every second
        if memory.metrics_endpoint:
            status, body = await _get(session, backend, "/metrics")
            if status != 200:
                memory.metrics_endpoint = status not in (404, 501)
                return
            values = {m.group(1): _number(m.group(2)) for m in _METRIC.finditer(body)}
            seen.slots_busy = count(values.get(b"requests_processing"))
            seen.deferred = count(values.get(b"requests_deferred"), limit=1 << 31)
            if memory.props_slots is None:
                status, body = await _get(session, backend, "/props")
                props = _json(body) if status == 200 else None
                if isinstance(props, dict):
                    memory.props_slots = count(props.get("total_slots")) or None
            seen.slots_total = memory.props_slots
    except (aiohttp.ClientError, TimeoutError, _UnreadableAnswer):
        pass  # slot figures unknown this round
