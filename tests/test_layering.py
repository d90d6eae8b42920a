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
