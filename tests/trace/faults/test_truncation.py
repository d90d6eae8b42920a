"""Truncated stores and special files end in the project's errors, never in a signal (each probe runs in a
subprocess with bounded memory; see harness.py)."""

from __future__ import annotations

from .harness import run_probe


def test_lmdb_cut_at_every_page_boundary_raises_or_reads() -> None:
    cases = run_probe("lmdb_truncation")
    sizes = cases[0]
    psize, size = sizes["psize"], sizes["size"]
    cuts = cases[1:]
    boundaries = {c["case"][0] for c in cuts}
    assert {k * psize for k in range(size // psize + 1)} <= boundaries  # every page boundary
    assert sum(not c["case"][1] for c in cuts) >= size // psize // 4  # some without lock.mdb
    for c in cuts:
        n, _keep_lock = c["case"]
        if n < size:  # the file no longer holds every page its header refers to
            assert c["outcome"] == "error" and c["cls"] == "TraceCorruptError", c
            assert "truncated" in c["msg"] or "not a valid LMDB" in c["msg"], c
        else:
            assert c["outcome"] == "ok" and not c["damaged"] and c["intact"] == 7, c


def test_directory_store_records_cut_at_random_offsets_are_detected() -> None:
    cases = run_probe("dir_truncation")
    assert len(cases) > 50
    for c in cases:
        key, cut, n = c["case"]
        if c["outcome"] == "ok":  # the damage is found record by record, naming the key
            assert key in c["damaged"], c
        else:  # meta/progress: the trace cannot be opened, and the error says so
            assert c["outcome"] == "error" and c["cls"] in ("TraceCorruptError", "NotATraceError")


def test_special_files_in_a_directory_store_are_refused_without_hanging() -> None:
    cases = run_probe("special_files", timeout=60)
    assert len(cases) == 15
    for c in cases:
        key, kind = c["case"]
        if c["outcome"] == "ok":  # the record, or the step that needs it, is reported
            assert any(key in k or key in why for k, why in c["damaged"].items()), c
        else:  # meta/progress: the trace cannot be opened
            assert c["cls"] in ("TraceCorruptError", "NotATraceError"), c
        if kind != "dir" and c["outcome"] == "error":
            assert "not a regular file" in c["msg"] and key in c["msg"], c
