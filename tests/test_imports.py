"""The package's import graph, function-level (lazy) imports included, has no cycle.

Read from the source with `ast` (nothing is imported): an edge A -> B for every `import B`, `from B import
x` or `from B.x import ...` (relative imports resolved) naming a module of the package, wherever it stands
in A. Importing `pkg.sub` runs `pkg/__init__` first, so a module's edges to its own ancestor packages are
not counted (they are no cycle at import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def package_modules(src: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every module under ``src/package`` (``pkg.__init__`` -> ``pkg``)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imported_names(module: str, path: Path, tree: ast.AST) -> set[str]:
    """Every dotted name an import statement anywhere in ``tree`` may load (candidates, not yet filtered)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, lazy imports included, ancestor packages left out."""
    modules = package_modules(src, package)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = imported_names(name, path, tree) & set(modules)
        graph[name] = {dep for dep in found if dep != name and not name.startswith(dep + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(SRC, "fedsb")
    assert len(graph) > 50 and "fedsb.data.tasks" in graph["fedsb.data"]
    assert cycles(graph) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "files, expected",
    [
        # a lazy import inside a function closes the cycle
        (
            {
                "p/__init__.py": "",
                "p/a.py": "from p.b import x\n",
                "p/b.py": "def f():\n    from p import a\n",
            },
            [["p.a", "p.b"]],
        ),
        # a relative import in a package's __init__ and a submodule importing a sibling through it
        (
            {
                "p/__init__.py": "from .a import y\n",
                "p/a.py": "import p.c\n",
                "p/c.py": "from p.a import z\n",
            },
            [["p.a", "p.c"]],
        ),
        # a child importing its own package is no cycle; neither is a one-way chain
        (
            {"p/__init__.py": "from p.a import y\n", "p/a.py": "import p\nfrom p.b import q\n", "p/b.py": ""},
            [],
        ),
    ],
)
def test_the_cycle_finder_sees_lazy_and_relative_imports(
    tmp_path: Path, files: dict[str, str], expected: list[list[str]]
) -> None:
    _write(tmp_path, files)
    assert cycles(import_graph(tmp_path, "p")) == expected
