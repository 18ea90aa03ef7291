"""A configuration problem, named by its dotted key and where it was written; every one found is raised
together as ``ConfigError``, in the order of the YAML file's lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """``key``: dotted (``backends[1].url``); ``line``: its line in the YAML file; ``origin``: where else
    the value came from (``LLMBALANCER_PORT``, ``command line``, ``backends.txt line 3``)."""

    key: str
    message: str
    line: int | None = None
    origin: str | None = None

    def __str__(self) -> str:
        where = [f"line {self.line}"] if self.line else []
        if self.origin:
            where.append(f"from {self.origin}")
        return f"{self.key or '<root>'}{' (' + ', '.join(where) + ')' if where else ''}: {self.message}"


def in_line_order(problems: Iterable[Problem]) -> list[Problem]:
    """By YAML line, those without one last; each found once, first-found first on a tie."""
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line is None, p.line or 0))


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
