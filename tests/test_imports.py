"""The router package's modules import each other without a circle (imports
under ``TYPE_CHECKING`` count too): each can be read, and tested, below the
ones that use it."""

import ast
from pathlib import Path

import expertmesh

PACKAGE = Path(expertmesh.__file__).parent


def imports(package: Path, name: str) -> dict[str, set[str]]:
    """Module (dotted, under ``name``) -> the modules of that package it imports."""
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
                target = f"{base}.{node.module}" if base and node.module else (node.module or base)
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
        out[module] = found
    return {m: {i for i in found if i in out and i != m and i.startswith(name)} for m, found in out.items()
            if m.startswith(name)}


def circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports in ``graph``, or []."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_the_router_package_imports_form_no_circle():
    graph = imports(PACKAGE, "expertmesh.router")
    assert "expertmesh.router.membership" in graph["expertmesh.router.router"]  # the walk sees relative imports
    assert "expertmesh.router" not in {i for m, found in graph.items() if m != "expertmesh.router" for i in found}
    found = circle({m: {i for i in found if i != "expertmesh.router"} for m, found in graph.items()})
    assert not found, " -> ".join(found)
