"""Ollama's ``options`` as the backend's sampling parameters, or a refusal naming the one it cannot take.

Each option that changes the answer goes to the parameter of the same meaning: llama.cpp's server takes
nearly all of Ollama's (they share the sampler); a plain OpenAI-compatible server takes OpenAI's and the
extensions vLLM documents (``top_k``, ``min_p``, ``repetition_penalty``). An option with no equivalent
on the chosen backend is refused (400, naming it), unless its value is the one that changes nothing
(``tfs_z: 1``, ``mirostat: 0``, ...). Options about loading and running the model (``num_ctx``,
``num_gpu``, ``num_thread``, ...) belong to the backend's own command line: they are ignored, with a
debug log, as are options Ollama itself does not know (it ignores them too, with a warning).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from llmbalancer.errors import ProxyError
from llmbalancer.translate.kinds import Family

log = structlog.get_logger("llmbalancer.translate")

# Ollama option -> (llama.cpp's parameter, a plain OpenAI-compatible server's); None: no equivalent there.
_SAMPLING: dict[str, tuple[str | None, str | None]] = {
    "temperature": ("temperature", "temperature"),
    "top_p": ("top_p", "top_p"),
    "top_k": ("top_k", "top_k"),
    "min_p": ("min_p", "min_p"),
    "seed": ("seed", "seed"),
    "stop": ("stop", "stop"),
    "num_predict": ("max_tokens", "max_tokens"),
    "presence_penalty": ("presence_penalty", "presence_penalty"),
    "frequency_penalty": ("frequency_penalty", "frequency_penalty"),
    "repeat_penalty": ("repeat_penalty", "repetition_penalty"),
    "repeat_last_n": ("repeat_last_n", None),
    "typical_p": ("typical_p", None),
    "mirostat": ("mirostat", None),
    "mirostat_tau": ("mirostat_tau", None),
    "mirostat_eta": ("mirostat_eta", None),
    "num_keep": ("n_keep", None),
    # Removed from llama.cpp's sampler (it accepts the field and ignores it): no equivalent anywhere.
    "tfs_z": (None, None),
    "penalize_newline": (None, None),
}
# Values with which an option changes nothing: no equivalent needed.
_NO_EFFECT: dict[str, tuple[Any, ...]] = {
    "tfs_z": (1, 1.0),
    "typical_p": (1, 1.0),
    "mirostat": (0,),
    "penalize_newline": (False,),
    "repeat_penalty": (1, 1.0),
}
# Options that only matter with another one set to something that changes the answer.
_ONLY_WITH = {"mirostat_tau": "mirostat", "mirostat_eta": "mirostat", "repeat_last_n": "repeat_penalty"}
# Keeping the first tokens when the context shifts: OpenAI-compatible servers never shift (they refuse a
# prompt that does not fit), so there it changes nothing.
_NO_CONTEXT_SHIFT = frozenset({"num_keep"})
# How and where the model runs, set on the backend's own command line.
RUNTIME = frozenset(
    {
        "num_ctx", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
        "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread",
    }
)


def unsupported(what: str, backend: str, family: Family) -> ProxyError:
    server = "a llama.cpp server" if family == "llamacpp" else "an OpenAI-compatible server"
    return ProxyError(
        400, f"{what} has no equivalent on backend {backend} ({server}); the request was not sent",
        "invalid_request_error", "unsupported_option",
    )


def _changes_nothing(name: str, value: Any, options: Mapping[str, Any]) -> bool:
    if value is None or value in _NO_EFFECT.get(name, ()):
        return True
    needs = _ONLY_WITH.get(name)
    if needs is not None:
        other = options.get(needs)
        return other is None or other in _NO_EFFECT.get(needs, ())
    return False


def sampling_params(options: Any, family: Family, backend: str) -> dict[str, Any]:
    """The backend's parameters for ``options`` (Ollama's), or ``ProxyError`` 400 naming one it cannot take."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ProxyError(400, "options must be an object", "invalid_request_error", "invalid_options")
    params: dict[str, Any] = {}
    column = 0 if family == "llamacpp" else 1
    for name, value in options.items():
        if name in RUNTIME:
            log.debug("ollama_option_ignored", option=name, value=value, reason="set on the backend's command line")
            continue
        names = _SAMPLING.get(name)
        if names is None:
            log.debug("ollama_option_ignored", option=name, reason="unknown to Ollama")
            continue
        target = names[column]
        if target is None:
            if _changes_nothing(name, value, options):
                continue
            if family == "openai" and name in _NO_CONTEXT_SHIFT:
                log.debug("ollama_option_ignored", option=name, reason="no context shift on this backend")
                continue
            raise unsupported(f"option {name!r} (= {value!r})", backend, family)
        if name == "num_predict" and value == -1:
            continue  # Ollama's "no limit" is every backend's default
        if name == "stop" and isinstance(value, str):
            value = [value]
        params[target] = value
    return params
