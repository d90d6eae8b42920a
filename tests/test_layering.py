"""Imports go one way: integrations → explaind_attr → explaind_kernel → explaind_trace."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["explaind_trace", "explaind_kernel", "explaind_attr", "integrations"]
#: Entry-point shims that delegate to the application layer (explaind_attr.app); they are
#: run as `python -m ...`, never imported by library code.
ENTRY_POINTS = {"explaind_kernel/__main__.py": {"explaind_attr"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", ORDER)
def test_imports_go_one_way(package: str) -> None:
    forbidden = set(ORDER[ORDER.index(package) + 1 :]) | {"examples", "bench", "tests"}
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        hit = _imports(path) & forbidden
        hit -= ENTRY_POINTS.get(str(path.relative_to(ROOT)), set())
        if hit:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_no_pickle_anywhere() -> None:
    bad = []
    for package in ORDER:
        for path in (ROOT / package).rglob("*.py"):
            mods = _imports(path)
            text = path.read_text()
            loads = ("torch" + ".load(", "allow_" + "pickle=True")  # split: not a load itself
            if "pickle" in mods or any(x in text for x in loads):
                bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"pickle-capable code in {bad}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of the four packages it imports, anywhere in its source (in
    functions and ``TYPE_CHECKING`` blocks too), relative imports resolved."""
    files = {_module_name(p): p for pkg in ORDER for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def target(name: str) -> str | None:
        while name and name not in files:  # `import a.b.c` of a name inside a module
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                # `from m import x`: x may be a submodule of m
                found = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in files]
                if len(found) < len(node.names):
                    found.append(module)
            for imported in found:
                hit = target(imported)
                if hit is not None and hit != name:
                    graph[name].add(hit)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:
        members, start = set(comp), comp[0]
        # a shortest way back to start inside the component
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v] & members):
                if w == start:
                    cycles.append([*paths[v], start])
                    queue = []
                    break
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return cycles


def test_the_import_graph_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_are_resolved() -> None:
    graph = _import_graph()
    assert "explaind_trace.codec" in graph["explaind_trace.reader"]  # from . import codec
    assert "explaind_trace.errors" in graph["explaind_trace.stores.base"]  # from ..errors
    assert "explaind_trace.optimizers" in graph["explaind_kernel.rules.base"]  # absolute


def test_no_import_cycles() -> None:
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


MAX_LINES = 500  # one job per module: split a file that grows past this


def test_no_library_module_is_over_500_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for package in ORDER
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)
