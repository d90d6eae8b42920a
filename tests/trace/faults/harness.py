"""Run fault probes in a subprocess, so that a signal (SIGBUS, SIGSEGV) or a hang fails the
test instead of killing the test run, with the child's memory bounded by setrlimit.

A probe (``probes.py``) runs many cases in one child process and prints one JSON line per
case: ``{"case", "outcome": "ok"|"error"|"raw", "cls", "msg", ...}``. ``ok``: the read
succeeded; ``error``: an ``ExplaindError`` subclass was raised (``cls``); ``raw``: anything
else escaped, which no test accepts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
MEMORY_BUDGET = 768 << 20  # bytes of address space a probe may add after its imports


def run_probe(name: str, timeout: float = 120, **kwargs: Any) -> list[dict[str, Any]]:
    """The case lines of probe ``name``; fails the test on a signal, a hang or a crash."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "tests.trace.faults.probes", name, json.dumps(kwargs)]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"probe {name} hung for {timeout} s: {e.stdout!r:.400}") from None
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    last = cases[-1]["case"] if cases else "before the first case"
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise AssertionError(f"probe {name} died by {sig} after case {last!r}:\n{proc.stderr}")
    if proc.returncode != 0:
        raise AssertionError(
            f"probe {name} exited {proc.returncode} after {last!r}:\n{proc.stderr}"
        )
    raw = [c for c in cases if c["outcome"] == "raw"]
    assert not raw, f"non-ExPLAIND errors escaped in probe {name}: {raw[:5]}"
    return cases
