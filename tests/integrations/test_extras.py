"""The integrations are optional extras: lazy package import, clear errors without the framework."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import integrations
from integrations.errors import IntegrationError, MissingExtraError

ROOT = Path(__file__).resolve().parents[2]


def test_package_import_is_light() -> None:
    code = (
        "import sys, integrations, integrations.errors; "
        "heavy = [m for m in ('torch', 'lightning', 'transformers', 'explaind_trace.recorder', "
        "'explaind_trace.reader') if m in sys.modules]; "
        "assert issubclass(integrations.IntegrationError, sys.modules['explaind_trace.errors'].ExplaindError); "
        "assert not heavy, heavy; "
        "assert set(integrations.__all__) <= set(dir(integrations))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.mark.parametrize(
    "module, framework, extra",
    [
        ("integrations.lightning", "lightning", "explaind[lightning]"),
        ("integrations.huggingface", "transformers", "explaind[huggingface]"),
    ],
)
def test_missing_framework_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, framework: str, extra: str
) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, framework, None)  # makes `import framework` fail
    with pytest.raises(ImportError, match="pip install " + re.escape(extra)) as info:
        importlib.import_module(module)
    assert isinstance(info.value, MissingExtraError) and isinstance(info.value, IntegrationError)


def test_lazy_names_resolve_to_the_callbacks() -> None:
    pytest.importorskip("lightning")  # the Lightning extra; the lookup imports it
    from integrations.lightning import ExplaindCallback

    assert integrations.ExplaindCallback is ExplaindCallback
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        integrations.nope  # noqa: B018
