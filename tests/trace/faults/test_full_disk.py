"""A real full filesystem: a 2 MiB tmpfs mounted for the test (root only; skipped otherwise)."""

from __future__ import annotations

import os
import subprocess

import pytest

from .harness import run_probe


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk test runs as root only")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_recording_into_a_full_disk_raises_and_keeps_every_committed_step(small_fs) -> None:
    cases = {tuple(c["case"]): c for c in run_probe("full_disk", mount=str(small_fs))}
    for scheme in ("lmdb", "dir"):
        rec = cases[(scheme, "record")]
        # raised in the training thread, saying why
        assert rec["outcome"] == "error" and rec["cls"] == "TraceWriteError", rec
        assert "disk full" in rec["msg"] and rec["at"] > 0, rec
        # every step committed before reads back whole, replay included
        read = cases[(scheme, "read")]
        assert read["outcome"] == "ok" and not read["damaged"], read
        assert read["intact"] == read["steps"] and read["steps"] >= rec["at"] - 1, (rec, read)
        # the failure is written into the trace: `explaind info` says so
        info = cases[(scheme, "info")]
        assert info["outcome"] == "ok" and info["error"].startswith("disk full"), info
        # a new recording on the full disk: a clear error, before the training loop runs
        full = cases[(scheme, "record-full")]
        assert full["outcome"] == "error" and "disk full" in full["msg"], full
        assert full["cls"] in ("DiskFullError", "TraceWriteError"), full
    # read-only opening on a full disk without LMDB's lock file
    no_lock = cases[("lmdb", "read-no-lock")]
    assert no_lock["outcome"] == "ok" and no_lock["intact"] == no_lock["steps"], no_lock
