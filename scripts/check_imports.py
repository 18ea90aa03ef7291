"""CI check: no import cycles inside ``llmbalancer/``, and no package importing one above it.

Every import counts: inside functions and under ``if TYPE_CHECKING:`` too. Layers, lowest first; a
module may import its own layer and those below (``testing`` imports nothing of the daemon).
Exit 1 with each cycle and each upward import named.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llmbalancer"
# The first part after `llmbalancer.` names the layer; top-level modules are named in full.
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "service": 0, "config": 0, "counters": 0,
    "fleet": 1,
    "auth": 2,
    "scheduling": 2,
    "relay": 3,
    "supervisor": 3,
    "translate": 4,
    "batches": 3,
    "state": 3,
    "observe": 4,
    "configure": 5, "components": 5, "reloading": 5,
    "web": 6,
    "app": 7,
    "server": 8, "status": 8, "agent": 8,
    "cli": 9, "__main__": 10,
    "testing": 0,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {m for a in node.names if (m := resolve(a.name, known))}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                resolved = full if full in known else resolve(target, known)
                if resolved:
                    found.add(resolved)
    found.discard(name)
    return found


def layer(module: str) -> tuple[str, int]:
    first = module.split(".")[1] if "." in module else "__init__"
    if first not in LAYERS:
        raise SystemExit(f"{module}: not placed in a layer (scripts/check_imports.py LAYERS)")
    return first, LAYERS[first]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main() -> int:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for module, targets in sorted(graph.items()):
        home, level = layer(module)
        for target in sorted(targets):
            their_home, their_level = layer(target)
            upward = their_level > level or (home == "testing") != (their_home == "testing")
            if their_home != home and upward and target != PACKAGE:
                problems.append(f"upward import: {module} ({home}) imports {target} ({their_home})")
    for problem in problems:
        print(problem)
    if not problems:
        print(f"imports ok: {len(known)} modules, no cycles, no upward imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
