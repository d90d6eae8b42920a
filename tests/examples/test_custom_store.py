"""examples/custom_store: a user-defined SQLite Store, end to end and against the contract."""

from __future__ import annotations

import pytest

import explaind_trace

from .conftest import assert_complete, load_script

run = load_script("custom_store", "run")
SQLiteStore = run.SQLiteStore


def test_record_kernel_completeness_through_sqlite(tmp_path, capsys) -> None:
    summary = run.main(["--out", str(tmp_path), "--steps", "12", "--n-test", "4", "--no-progress"])
    assert summary["trace"].startswith("sqlite://")
    assert summary["steps"] == 12 and summary["finished"]
    assert (tmp_path / "trace.sqlite").is_file() and summary["trace_bytes"] > 0
    assert_complete(summary["completeness_max_abs"], summary["max_abs_fT"])
    assert "completeness: max_abs=" in capsys.readouterr().out


def test_sqlite_scheme_is_registered() -> None:
    assert "sqlite" in explaind_trace.available_schemes()


def test_store_contract(tmp_path) -> None:
    path = tmp_path / "kv.sqlite"
    store = explaind_trace.open_store(f"sqlite://{path}", readonly=False)
    assert isinstance(store, SQLiteStore)
    store.put("b/2", b"two")
    store.put("a", b"one")
    assert store.get("a") is None  # staged, not committed
    store.commit()
    store.put("b/1", b"uncommitted")
    assert store.get("a") == b"one"
    assert list(store.keys()) == ["a", "b/2"]
    assert list(store.keys("b/")) == ["b/2"]
    store.close()  # drops the staged put
    reader = SQLiteStore(path, readonly=True)
    try:
        assert list(reader.keys()) == ["a", "b/2"]
        with pytest.raises(explaind_trace.StoreError, match="read-only"):
            reader.put("c", b"x")
    finally:
        reader.close()
    with pytest.raises(explaind_trace.StoreError, match="does not exist"):
        SQLiteStore(tmp_path / "missing.sqlite", readonly=True)
