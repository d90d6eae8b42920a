"""A flipped bit anywhere in any stored record is detected (checksums), never a signal."""

from __future__ import annotations

from .harness import run_probe

KINDS = ("meta", "progress", "step/", "ckpt/", "final", "sample/", "skip/")


def test_a_bit_flip_in_every_record_kind_is_detected() -> None:
    cases = run_probe("byte_flips", timeout=240)
    seen = {(c["case"][0], c["case"][1]) for c in cases}
    assert seen == {(s, k) for s in ("lmdb", "dir") for k in KINDS}
    for c in cases:
        _scheme, kind, key, _pos, _bit = c["case"]
        if kind in ("meta", "progress"):  # the trace does not open, and says why
            assert c["outcome"] == "error" and c["cls"] == "TraceCorruptError", c
            assert f"record {key!r}" in c["msg"], c
        else:  # reported record by record, by key (a sample also by the steps that need it)
            assert c["outcome"] == "ok" and key in c["damaged"], c
            assert (
                "checksum mismatch" in c["damaged"][key] or "checksum header" in c["damaged"][key]
            ), c
