"""`explaind demo` in its quick configuration: trace, exact kernel, report."""

from __future__ import annotations

import json

import pytest

from explaind_attr.app.demo import DemoConfig, DemoSummary, run_demo
from explaind_attr.errors import UsageError

from .conftest import FP32_REL, parse_completeness


def test_quick_demo_writes_an_exact_report(tmp_path) -> None:
    summary = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert isinstance(summary, DemoSummary)
    assert summary.report.is_file() and summary.report.name == "report.html"
    html = summary.report.read_text(encoding="utf-8")
    assert summary.completeness_line in html  # the report opens with it
    max_abs, rel = parse_completeness(summary.completeness_line)
    assert rel <= FP32_REL
    assert max_abs == pytest.approx(summary.completeness_max_abs, rel=1e-3)
    assert summary.trace.is_dir() and summary.result.is_file() and summary.figure.is_file()
    assert summary.steps == DemoConfig.quick().steps
    assert set(summary.seconds) == {"record", "kernel", "report", "total"}
    assert "tokens:" in (summary.report.parent / "report.md").read_text(encoding="utf-8")
    marker = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert marker["completeness_line"] == summary.completeness_line


def test_demo_never_replaces_a_trace_it_did_not_write(tmp_path) -> None:
    (tmp_path / "trace.lmdb").mkdir()
    with pytest.raises(UsageError, match="was not written by the demo"):
        run_demo(tmp_path, quick=True, progress=False)


def test_demo_config_names_the_bad_field() -> None:
    with pytest.raises(UsageError, match="DemoConfig.steps must be a positive integer"):
        DemoConfig(steps=0)
    with pytest.raises(UsageError, match="train_fraction"):
        DemoConfig(train_fraction=1.5)
