"""Load the example scripts in-process (they are scripts, not a package) and check results.

Scripts put their own folder on sys.path for their sibling modules, as `python script.py`
would; here they get unique module names so the folders' train.py / analyze.py never collide.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

#: fp32 rounding accumulated over the sweep, as in tests/kernel/test_completeness.py
FP32_REL = 1e-4

_LINE = re.compile(r"^completeness: max_abs=(\S+) rel=(\S+)$")


def load_script(folder: str, name: str) -> ModuleType:
    """Import examples/<folder>/<name>.py as module `examples_<folder>_<name>`."""
    path = EXAMPLES / folder / f"{name}.py"
    module_name = f"examples_{folder}_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def parse_completeness(line: str) -> tuple[float, float]:
    """(max_abs, rel) from a `completeness: max_abs=… rel=…` line."""
    m = _LINE.match(line.strip())
    assert m, f"not a completeness line: {line!r}"
    return float(m.group(1)), float(m.group(2))


def assert_complete(max_abs: float, max_abs_fT: float) -> None:
    assert np.isfinite(max_abs)
    assert max_abs <= FP32_REL * max_abs_fT, (max_abs, max_abs_fT)
