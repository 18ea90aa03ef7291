"""Validating the merged raw mapping against the schema: pydantic's errors as ``Problem`` s named by
dotted key, in plain words; and a partial ``Config`` all the same (the invalid values left out, so
their defaults apply), so that the later steps report their problems in the same run."""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from llmbalancer.config.problems import Problem
from llmbalancer.config.schema import Config

Path = tuple[str | int, ...]
# Pruning an invalid value can make its item invalid (a required key gone): that item goes next round.
_ROUNDS = 4


@dataclass
class Validated:
    """The (partial, where ``problems``) configuration. Items of a list that had to be left out shift
    the ones after them: ``renumber`` turns a later step's key back into the file's numbering."""

    config: Config
    problems: list[Problem]
    kept: dict[Path, list[int]] = field(default_factory=dict)
    lengths: dict[Path, int] = field(default_factory=dict)

    def renumber(self, problem: Problem) -> Problem:
        for path, kept in self.kept.items():
            if len(kept) == self.lengths[path] or any(isinstance(p, int) for p in path):
                continue
            extra = self.lengths[path] - len(kept)  # items added after validation follow the file's
            pattern = re.compile(rf"(?<![\w.]){re.escape(dotted(path))}\[(\d+)\]")

            def original(match: re.Match[str], kept: list[int] = kept, extra: int = extra, path: Path = path) -> str:
                index = int(match.group(1))
                return f"{dotted(path)}[{kept[index] if index < len(kept) else index + extra}]"

            problem = Problem(pattern.sub(original, problem.key), pattern.sub(original, problem.message),
                              problem.line, problem.origin)
        return problem


def validate(raw: Mapping[str, Any]) -> Validated:
    problems: list[Problem] = []
    drops: set[Path] = set()
    for round_ in range(_ROUNDS):
        kept: dict[Path, list[int]] = {}
        lengths: dict[Path, int] = {}
        pruned = _prune(raw, (), drops, kept, lengths)
        try:
            config = Config.model_validate(pruned)
        except ValidationError as exc:
            dropped = set()
            for error in exc.errors():
                path = _original(error["loc"], kept)
                if round_ == 0:
                    problems.append(Problem(dotted(path), message(error, path)))
                dropped.add(_present(raw, path, drops))
            drops |= dropped
        else:
            return Validated(config, problems, kept, lengths)
    return Validated(Config(), problems)


def dotted(path: Sequence[str | int]) -> str:
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _original(loc: Sequence[str | int], kept: Mapping[Path, list[int]]) -> Path:
    path: Path = ()
    for part in loc:
        if isinstance(part, int) and path in kept and part < len(kept[path]):
            part = kept[path][part]
        path += (part,)
    return path


def _present(raw: Any, path: Path, drops: set[Path]) -> Path:
    """The longest start of ``path`` that is in ``raw`` and not dropped yet (a missing key: the mapping
    that lacks it)."""
    node = raw
    for length, part in enumerate(path):
        if path[: length + 1] in drops:
            return path[:length]
        if isinstance(node, Mapping) and part in node:
            node = node[part]
            continue
        if not isinstance(node, list) or not isinstance(part, int) or part >= len(node):
            return path[:length]
        node = node[part]
    return path


def _prune(node: Any, here: Path, drops: set[Path], kept: dict[Path, list[int]], lengths: dict[Path, int]) -> Any:
    if isinstance(node, Mapping):
        return {k: _prune(v, (*here, k), drops, kept, lengths) for k, v in node.items() if (*here, k) not in drops}
    if isinstance(node, list):
        indexes = [i for i in range(len(node)) if (*here, i) not in drops]
        kept[here], lengths[here] = indexes, len(node)
        return [_prune(node[i], (*here, i), drops, kept, lengths) for i in indexes]
    return node


# --- plain words -------------------------------------------------------------------------------

_WORDS: dict[str, str] = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "literal_error": "must be one of {expected}",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}
_BOUNDS = frozenset({"greater_than_equal", "greater_than", "less_than_equal", "less_than"})


def message(error: ErrorDetails, path: Path) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _fields_at(path[:-1])
        return f"unknown key (known: {', '.join(known)})" if known else "unknown key"
    if kind == "missing":
        return "is required"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    value = error.get("input")
    shown = type(value).__name__ if isinstance(value, Mapping | list) else repr(value)
    if kind in _BOUNDS:
        shown = str(value)
    words = _WORDS.get(kind)
    text = words.format(**ctx) if words else error["msg"][:1].lower() + error["msg"][1:]
    return f"{text}, got {shown}"


def _fields_at(path: Path) -> list[str]:
    """The keys a mapping at ``path`` may hold (a model's fields)."""
    annotation: Any = Config
    for part in path:
        annotation = _element(annotation, part)
        if annotation is None:
            return []
    return list(annotation.model_fields) if _is_model(annotation) else []


def _element(annotation: Any, part: str | int) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(part, int):
        return args[0] if typing.get_origin(annotation) is tuple and args else None
    if _is_model(annotation) and part in annotation.model_fields:
        return annotation.model_fields[part].annotation
    if len(args) == 1:  # X | None
        return _element(args[0], part)
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)

