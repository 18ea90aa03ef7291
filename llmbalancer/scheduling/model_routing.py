"""Model-aware routing: which backends may take a request for a model, and the name each knows it by.

A backend's models are those declared in config (``backends[].models``) and those discovered from
it (``served_models``, filled by the health poller). A backend with neither is *open*: it may take
any model, because a single-model llama.cpp server ignores the request's ``model``. For a model M:

1. The first route (``routing.models``, regex matched in full, in order) that matches M decides:
   its backends that serve M or are open, or all of its backends if none of them is known to (a
   route naming no backends narrows nothing: steps 3 and 4 decide; it only sets ``race``).
2. Else the ``routing.fallback`` backend, when configured (as llama-balancer's ``fallback_server``:
   every model no route matches goes there).
3. Else the backends known to serve M.
4. Else the open backends.
5. Else, on the OpenAI routes, when the fleet serves one model only (every backend that lists models
   lists exactly one, the same one), that model's backends answer any name, as a single llama.cpp
   server does — unless ``routing.strict_models``. Otherwise M is unknown: 404 listing what is served
   (Ollama's routes always answer an unknown name so: Ollama does, and its clients act on it).

Names match when equal, ignoring case and Ollama's implicit ``:latest`` tag, or when M is a served
model file's stem: llama-server started without ``--alias`` names its model by its GGUF path
(``/models/SmolLM2-135M-Instruct.Q4_1.gguf``), which ``SmolLM2-135M-Instruct.Q4_1`` (any case) names too.

Instance aliases: ``name``, ``name-2``, ``name-3`` (llama-balancer's convention for several copies
of one model) are one model to clients. A backend serving ``name-2`` serves ``name``; the proxy
rewrites the body's ``model`` to the backend's own name for it. ``/v1/models`` hides the aliases.
Ollama's implicit ``:latest`` tag is honoured both ways (``llama3`` is ``llama3:latest``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterable, Iterator

import structlog

from llmbalancer import errors
from llmbalancer.config import Config, ModelRoute, RoutingConfig
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.selectors import RequestFacts

# The routes whose body's `model` picks the backend (OpenAI, Anthropic's Messages, llama.cpp native, Ollama).
MODEL_ROUTES = frozenset(
    {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/completion",
        "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show",
    }
)
log = structlog.get_logger("llmbalancer.scheduling.model_routing")

_ALIAS = re.compile(r"(?P<base>.+)-(?P<n>[2-9]|[1-9][0-9]+)")
_LATEST = ":latest"
_CACHED_MODELS = 256
_CACHED_NAME_CHARS = 256
_MODEL_FILE_EXTENSIONS = (".gguf", ".llamafile", ".safetensors", ".bin")


def served_names(backend: Backend) -> tuple[str, ...]:
    """Declared then discovered model names, de-duplicated; empty means the backend is open."""
    return tuple(dict.fromkeys((*backend.models, *backend.health.served_models)))


def _bare(name: str) -> str:
    return name.removesuffix(_LATEST)


def _keys(name: str) -> tuple[str, ...]:
    """What ``name`` answers to, folded: itself, and a model file's stem (directories and extension gone)."""
    key = _bare(name).casefold()
    stem = key.rsplit("/", 1)[-1]
    for extension in _MODEL_FILE_EXTENSIONS:
        if stem.endswith(extension):
            stem = stem[: -len(extension)]
            break
    return (key,) if stem == key else (key, stem)


def instances(model: str, names: Iterable[str]) -> list[str]:
    """The names in ``names`` that are ``model`` or one of its ``-N`` instances, ``model`` first."""
    wanted = _bare(model).casefold()
    found: list[tuple[int, str]] = []
    for name in names:
        keys = _keys(name)
        if wanted in keys:
            found.append((1, name))
            continue
        for key in keys:
            alias = _ALIAS.fullmatch(key)
            if alias is not None and alias["base"] == wanted:
                found.append((int(alias["n"]), name))
                break
    return [name for _, name in sorted(found)]


def single_model(backends: Iterable[Backend]) -> str | None:
    """The one model the fleet serves, when every backend that lists models lists exactly that one."""
    only: str | None = None
    for backend in backends:
        names = served_names(backend)
        if not names:
            continue
        if len(names) != 1 or (only is not None and _keys(names[0])[0] != _keys(only)[0]):
            return None
        only = names[0]
    return only


def client_names(names: Iterable[str]) -> list[str]:
    """What clients are shown: every name once, ``-N`` instances hidden where their base is served."""
    unique = list(dict.fromkeys(names))
    bases = {_bare(n) for n in unique}
    shown = []
    for name in unique:
        alias = _ALIAS.fullmatch(_bare(name))
        if alias is not None and alias["base"] in bases:
            continue
        shown.append(name)
    return shown


class ModelRouter:
    def __init__(self, routing: RoutingConfig | None = None) -> None:
        routing = routing or RoutingConfig()
        self._routes = [(re.compile(route.pattern), route) for route in routing.models]
        self._fallback = routing.fallback
        self._strict = routing.strict_models
        self._single_noted: set[str] = set()  # single-model fleets already logged (one line per model)
        self._races = any(route.race > 1 for route in routing.models)
        # Several instances on one backend take turns (the backend sees each by its own name).
        self._turns: dict[tuple[str, str], Iterator[int]] = {}
        self._allowed: dict[str, tuple[int, frozenset[Backend]]] = {}

    @staticmethod
    def model_of(facts: RequestFacts) -> str | None:
        """The model that routes this request, or None where routing by model does not apply."""
        return facts.model if facts.path in MODEL_ROUTES else None

    def route_for(self, model: str) -> ModelRoute | None:
        for pattern, route in self._routes:
            if pattern.fullmatch(model):
                return route
        return None

    def race_for(self, facts: RequestFacts) -> int:
        """How many backends this request is sent to at once (1: no racing)."""
        if not self._races:
            return 1
        model = self.model_of(facts)
        route = self.route_for(model) if model is not None else None
        return route.race if route is not None else 1

    def eligible(self, model: str, backends: Iterable[Backend], any_name: bool = True) -> list[Backend]:
        """The backends that may take ``model``, whatever their state (the dispatcher checks that).
        ``any_name``: a one-model fleet answers any name (OpenAI routes; Ollama's answer unknown names 404)."""
        pool = list(backends)
        route = self.route_for(model)
        if route is not None and route.backends:
            chosen = [b for b in pool if b.name in route.backends]
            serving = [b for b in chosen if not served_names(b) or instances(model, served_names(b))]
            return serving or chosen
        if route is None and self._fallback is not None:
            return [b for b in pool if b.name == self._fallback]
        known = [b for b in pool if instances(model, served_names(b))]
        if known:
            return known
        open_backends = [b for b in pool if not served_names(b)]
        if open_backends or self._strict or not any_name:
            return open_backends
        only = single_model(pool)
        if only is None:
            return []
        if only not in self._single_noted:
            self._single_noted.add(only)
            log.info("single_model_fleet", serves=only, asked=model[:200],
                     note="requests naming other models are answered by it (routing.strict_models refuses them)")
        return [b for b in pool if served_names(b)]

    def allowed(self, model: str, backends: Registry, any_name: bool = True) -> frozenset[Backend]:
        """``eligible`` as a set, cached per model until membership or a backend's model lists change
        (``Registry.models_version``)."""
        seen = backends.models_version
        key = model if any_name else "\0" + model
        cached = self._allowed.get(key)
        if cached is not None and cached[0] == seen:
            return cached[1]
        allowed = frozenset(self.eligible(model, backends, any_name))
        if len(model) > _CACHED_NAME_CHARS:
            return allowed  # the cache keeps names: not a client's megabyte-long one
        if len(self._allowed) >= _CACHED_MODELS:
            self._allowed.clear()  # clients naming ever new models must not grow it without bound
        self._allowed[key] = (seen, allowed)
        return allowed

    def exclusion(
        self, facts: RequestFacts, backends: Registry, excluded: Collection[Backend], *, waiting: bool = False
    ) -> Collection[Backend]:
        """``excluded`` plus every backend that may not take this request's model, judged when the claim
        starts and again when a backend joins while it waits (``waiting``: for a claim that may wait).
        Unknown model: 404."""
        model = self.model_of(facts)
        if model is None:
            return excluded
        if (
            not waiting and not self._routes and self._fallback is None
            and not any(b.models or b.health.served_models for b in backends)
        ):
            # No routes and every backend open (none names a model): all may take any model, as below.
            # Not for a claim that waits: a backend naming models may join meanwhile.
            return excluded
        # Ollama's API answers an unknown model 404, so its clients (which may then pull it) are told the truth.
        exclusion = _Exclusion(self, model, backends, excluded, any_name=not facts.path.startswith("/api/"))
        if backends and not exclusion.allowed():
            raise errors.model_not_found(model, client_names(n for b in backends for n in served_names(b)))
        return exclusion

    def instance_for(self, model: str, backend: Backend) -> str:
        """The name ``backend`` knows ``model`` by (its own, when it serves it under an alias)."""
        names = instances(model, served_names(backend))
        if not names:
            return model
        if len(names) == 1:
            return names[0]
        turns = self._turns.setdefault((backend.name, model), itertools.count())
        return names[next(turns) % len(names)]

    def rename_for(self, facts: RequestFacts, backend: Backend) -> str | None:
        """The model name to put in the body sent to ``backend``, or None to send the body as it is."""
        model = self.model_of(facts)
        if model is None or facts.body is None or not (backend.models or backend.health.served_models):
            return None  # an open backend takes the model by the client's name
        name = self.instance_for(model, backend)
        return None if name == model else name


class _Exclusion(Collection[Backend]):
    """A lazy ``excluded`` collection for one claim. The eligible set is taken when the claim starts and
    taken again whenever membership or a backend's model lists changed since (``Registry.models_version``):
    a backend that joins while the request waits, or whose models become known meanwhile, may take it.
    A dispatcher's look at each backend costs an int comparison and a set lookup."""

    def __init__(
        self, router: ModelRouter, model: str, backends: Registry, excluded: Collection[Backend], any_name: bool
    ) -> None:
        self._router = router
        self._model = model
        self._any_name = any_name
        self._backends = backends
        self._excluded = excluded
        self._version = -1
        self._allowed: frozenset[Backend] = frozenset()

    def allowed(self) -> frozenset[Backend]:
        self._version = self._backends.models_version
        self._allowed = self._router.allowed(self._model, self._backends, self._any_name)
        return self._allowed

    def __contains__(self, backend: object) -> bool:
        if backend in self._excluded:
            return True
        if self._version != self._backends.models_version:
            self.allowed()
        return backend not in self._allowed

    def __iter__(self) -> Iterator[Backend]:
        return (b for b in self._backends if b in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def routing_problems(config: Config) -> list[tuple[str, str]]:
    """Routes whose pattern is no regex or that name no configured backend; an unknown fallback."""
    names = {b.name for b in config.backends} | {i.name for i in config.instances}
    problems = []
    for index, route in enumerate(config.routing.models):
        key = f"routing.models[{index}]"
        try:
            re.compile(route.pattern)
        except re.error as exc:
            problems.append((f"{key}.pattern", f"is not a valid regular expression ({exc}): {route.pattern!r}"))
        unknown = [n for n in route.backends if n not in names]
        if unknown:
            problems.append((f"{key}.backends", f"names unknown backend(s) {', '.join(unknown)} for {route.pattern!r}"))
    fallback = config.routing.fallback
    if fallback is not None and fallback not in names:
        problems.append(("routing.fallback", f"names unknown backend {fallback!r}"))
    return problems
