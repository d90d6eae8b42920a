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


def test_damaged_lmdb_value_sizes_and_overflow_page_counts_name_the_record() -> None:
    cases = run_probe("lmdb_node_sizes")
    layout, cases = cases[0], cases[1:]
    assert layout["need"] == 3 and layout["size"] > layout["psize"], layout
    assert len(cases) == 17
    for c in cases:
        key, field, value = c["case"]
        if key == "progress":  # the trace cannot be opened, and says which record
            assert c["outcome"] == "error" and c["cls"] == "TraceCorruptError", c
            assert "record 'progress'" in c["msg"] and "node.lmdb" in c["msg"], c
        elif field == "pages" and value == layout["need"] + 1:
            # LMDB reads a large value from its first overflow page and its size; a header
            # that announces a page more (inside the file) leaves every byte intact
            assert c["outcome"] == "ok" and not c["damaged"] and c["intact"] == 7, c
        else:  # reported naming the trace and the record (a sample: by the steps that need
            # it, LMDB's own page check stops the listing at it); earlier steps stay intact
            damaged = c["damaged"]
            assert c["outcome"] == "ok" and damaged, c
            assert all("node.lmdb" in why for why in damaged.values()), c
            assert key in damaged or any(f"record {key!r}" in why for why in damaged.values()), c
            if key.startswith("ckpt/"):
                assert c["intact"] == 3 and key in damaged, c
