"""A process killed with SIGKILL mid-run leaves a readable trace of its committed steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import explaind_trace as et
from tests.trace import trace_helpers as th

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, signal, sys, torch
import explaind_trace as et
from tests.trace import trace_helpers as th

torch.set_num_threads(int(sys.argv[2]))  # the parent's thread count: same reduction order
torch.manual_seed(0)
model = th.MLP()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
x, y = th.data()
with et.record(model, opt, store=sys.argv[1], checkpoint_every=2) as rec:
    for step in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
        if step == 4:
            rec.flush()  # steps 0..4 are committed
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_leaves_committed_steps_readable(tmp_path) -> None:
    path = tmp_path / "killed.lmdb"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(torch.get_num_threads())],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = th.data()
    thetas = []
    for _ in range(5):
        thetas.append(th.snapshot(model))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
    thetas.append(th.snapshot(model))

    with et.open_trace(path) as trace:
        assert trace.num_steps == 5 and not trace.finished and trace.error is None
        assert trace.final() is None and trace.checkpoint_steps == [0, 2, 4]
        assert trace.segments() == [(0, 2), (2, 4), (4, 5)]
        for rs in trace.replay():
            for n in trace.param_names:
                assert torch.equal(rs.params[n], thetas[rs.index][n])
                assert torch.equal(rs.next_params[n], thetas[rs.index + 1][n])
        assert trace.check_drift().exact
        assert all(torch.equal(trace.params_at(5)[n], thetas[5][n]) for n in trace.param_names)
