"""Models of backends that do not speak Ollama, described in Ollama's shapes (``/api/tags``, ``/api/ps``,
``/api/show``) from what the backends tell of them, and nothing else.

llama.cpp's ``/v1/models`` carries ``meta`` per model (``size`` in bytes, ``n_params``, ``n_ctx`` per slot,
``n_ctx_train``, ``ftype`` on newer builds) and an Ollama-style entry (``details.format``); its ``/props`` the
context per slot, the quantization (``model_ftype``), the chat template, whether it takes images
(``modalities.vision``) and tools (``chat_template_caps.supports_tools``). vLLM's ``/v1/models`` tells
``max_model_len``. What no backend tells — when the model was modified, its digest, its family, its
size in VRAM, when it unloads — is ``null``, which the official client reads as unknown (it rejects the
empty strings llama.cpp puts there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmbalancer.fleet.probes import count

_MAX_COUNT = 1 << 62


@dataclass(frozen=True, slots=True)
class ModelFacts:
    name: str
    size: int | None = None  # bytes of the model file
    parameters: int | None = None
    quantization: str | None = None
    format: str | None = None
    family: str | None = None
    context: int | None = None  # tokens one request may use (a llama.cpp slot's context)
    context_trained: int | None = None


def human_number(value: int) -> str:
    """A parameter count as Ollama writes it (``135M``, ``134.52M``, ``8B``, ``7.6B``)."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2)):
        if value >= scale:
            number = value / scale
            return f"{number:.0f}{unit}" if number.is_integer() else f"{number:.{decimals}f}{unit}"
    return f"{value / 1e3:.0f}K" if value >= 1000 else str(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _ollama_style(answer: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    entries = answer.get("models")
    found: dict[str, Mapping[str, Any]] = {}
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, Mapping) and (name := _text(entry.get("model")) or _text(entry.get("name"))):
            found[name] = entry
    return found


def model_facts(answer: Any, props: Any = None, declared: Iterable[str] = ()) -> list[ModelFacts]:
    """The models a backend's ``/v1/models`` answer lists (with its ``/props``, when llama.cpp), then the
    ``declared`` ones it does not list, known by name only."""
    facts: dict[str, ModelFacts] = {}
    if isinstance(answer, Mapping):
        styled = _ollama_style(answer)
        data = answer.get("data")
        for item in data if isinstance(data, list) else ():
            name = _text(item.get("id")) if isinstance(item, Mapping) else None
            if name is None or name in facts:
                continue
            meta = item.get("meta") if isinstance(item.get("meta"), Mapping) else {}
            details = styled.get(name, {}).get("details")
            details = details if isinstance(details, Mapping) else {}
            facts[name] = ModelFacts(
                name=name,
                size=count(meta.get("size"), _MAX_COUNT),
                parameters=count(meta.get("n_params"), _MAX_COUNT),
                quantization=_text(meta.get("ftype")),
                format=_text(details.get("format")),
                family=_text(details.get("family")),
                context=count(meta.get("n_ctx"), _MAX_COUNT) or count(item.get("max_model_len"), _MAX_COUNT),
                context_trained=count(meta.get("n_ctx_train"), _MAX_COUNT),
            )
    if isinstance(props, Mapping) and len(facts) == 1:  # /props describes a server's one model
        (name, one), = facts.items()
        settings = props.get("default_generation_settings")
        n_ctx = count(settings.get("n_ctx"), _MAX_COUNT) if isinstance(settings, Mapping) else None
        facts[name] = ModelFacts(
            one.name, one.size, one.parameters, one.quantization or _text(props.get("model_ftype")),
            one.format, one.family, one.context or n_ctx, one.context_trained,
        )
    for name in declared:
        facts.setdefault(name, ModelFacts(name))
    return list(facts.values())


def _details(facts: ModelFacts) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": facts.format,
        "family": facts.family,
        "families": [facts.family] if facts.family else None,
        "parameter_size": human_number(facts.parameters) if facts.parameters else None,
        "quantization_level": facts.quantization,
    }


def tag_entry(facts: ModelFacts) -> dict[str, Any]:
    """An ``/api/tags`` entry."""
    return {
        "name": facts.name, "model": facts.name, "modified_at": None, "size": facts.size, "digest": None,
        "details": _details(facts),
    }


def ps_entry(facts: ModelFacts) -> dict[str, Any]:
    """An ``/api/ps`` entry: a server that is up has its model loaded, until it stops."""
    return {
        "name": facts.name, "model": facts.name, "size": facts.size, "digest": None, "details": _details(facts),
        "expires_at": None, "size_vram": None, "context_length": facts.context,
    }


def _capabilities(props: Any) -> list[str]:
    found = ["completion"]
    if not isinstance(props, Mapping):
        return found
    caps = props.get("chat_template_caps")
    if isinstance(caps, Mapping) and caps.get("supports_tools") is True:
        found.append("tools")
    modalities = props.get("modalities")
    if isinstance(modalities, Mapping) and modalities.get("vision") is True:
        found.append("vision")
    return found


def show_answer(facts: ModelFacts, props: Any, backend: str) -> dict[str, Any]:
    """``/api/show``: what the backend tells of the model; ``num_ctx`` is the context a request may use."""
    parameters = f"num_ctx {facts.context}" if facts.context else ""
    modelfile = f"# {facts.name}, served by backend {backend} through llmbalancer\nFROM {facts.name}\n"
    if facts.context:
        modelfile += f"PARAMETER num_ctx {facts.context}\n"
    info: dict[str, Any] = {}
    if facts.parameters:
        info["general.parameter_count"] = facts.parameters
    if facts.context:
        info["general.context_length"] = facts.context
    if facts.context_trained:
        info["general.context_length_trained"] = facts.context_trained
    template = props.get("chat_template") if isinstance(props, Mapping) else None
    return {
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template if isinstance(template, str) else None,
        "details": _details(facts),
        "model_info": info,
        "capabilities": _capabilities(props),
        "modified_at": None,
    }
