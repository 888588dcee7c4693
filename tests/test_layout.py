"""The source tree reads like the system: import paths are source paths, the
package's imports form no circle, no file is long, tests do not import benchmarks/."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 400
GENERATED = ("expertmesh/v1/",)  # `make proto`'s stubs (tests/test_packaging.py checks they are current)


def package_dirs() -> dict[str, Path]:
    """Package name -> its folder, as pyproject.toml's ``package-dir`` installs them."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: REPO / folder for name, folder in setuptools["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    found = {}
    dirs = package_dirs()
    for package, folder in dirs.items():
        for file in folder.rglob("*.py"):
            parts = [*package.split("."), *file.relative_to(folder).with_suffix("").parts]
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not any(p.startswith(package + ".") and f"{name}.".startswith(p + ".") for p in dirs):
                found[name] = file  # (a folder that another package-dir entry maps elsewhere is not that package)
    return found


def imports(name: str, file: Path) -> list[tuple[int, str, int]]:
    """``(line, absolute module name, level)`` of every import in ``file`` (in functions and
    ``if TYPE_CHECKING:`` too); ``from M import x`` names ``M.x`` (a submodule, or M's attribute)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([base] if base else [])])
            out += [(node.lineno, f"{base}.{a.name}", node.level) for a in node.names]
    return out


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The package module ``target`` imports: itself, else its longest known prefix."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, file in known.items():
        for _, target, _ in imports(name, file):
            if target.split(".")[0] == "expertmesh" and (to := resolve(target, known)) not in (None, name):
                edges[name].add(to)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_cycle_finder_finds_a_circle_and_only_it():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_import_of_the_package_names_a_module_in_the_tree():
    known = modules()
    assert {"expertmesh.nodes.daemon", "expertmesh.discovery.record", "expertmesh.router.router"} <= set(known)
    wrong = [f"{file.relative_to(REPO)}:{line}: {target}" for name, file in known.items()
             for line, target, _ in imports(name, file)
             if target.split(".")[0] == "expertmesh" and resolve(target, known) is None]
    assert wrong == []


def test_nodes_and_discovery_import_the_package_absolutely():
    dirs = package_dirs()
    relative = [f"{file.relative_to(REPO)}:{line}" for name, file in modules().items()
                if name.startswith(("expertmesh.nodes", "expertmesh.discovery"))
                for line, _, level in imports(name, file) if level]
    assert {dirs["expertmesh.nodes"].name, dirs["expertmesh.discovery"].name} == {"nodes", "discovery"}
    assert relative == []


def test_the_package_imports_form_no_circle():
    found = cycles(graph())
    assert found == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_file_is_longer_than_400_lines():
    files = [f for d in ("expertmesh", "nodes", "discovery", "tests", "benchmarks") for f in (REPO / d).rglob("*.py")]
    long = {str(f.relative_to(REPO)): n for f in files
            if not str(f.relative_to(REPO)).startswith(GENERATED) and (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_runtime_does_not_import_the_test_fixtures():
    edges = graph()
    users = {m for m, to in edges.items() if any(t.startswith("expertmesh.testing") for t in to)}
    assert {m for m in users if not m.startswith("expertmesh.testing")} == {"expertmesh.demo"}  # `make demo`


def test_tests_do_not_import_benchmarks():
    bench = {f.stem for f in (REPO / "benchmarks").glob("*.py")} - {f.stem for f in (REPO / "tests").glob("*.py")}
    found = []
    for file in (REPO / "tests").glob("*.py"):
        if file.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] in bench | {"benchmarks"} for n in names) or (
                    isinstance(node, ast.Constant) and node.value == "benchmarks"):  # sys.path / "benchmarks"
                found.append(f"{file.name}:{node.lineno}")
    assert found == []
