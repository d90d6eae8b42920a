"""Hostile records (hypothesis): only the project's errors escape, and nothing runs code."""

from __future__ import annotations

from .harness import run_probe


def test_hostile_records_end_in_the_projects_errors_and_run_no_code() -> None:
    (case,) = run_probe("hostile_records", timeout=300)
    assert not case["ran_code"], "a record was unpickled"
    assert case["outcome"] == "ok", case["msg"]
    assert case["examples"] >= 80 and case["errors"] >= case["examples"] // 2, case
