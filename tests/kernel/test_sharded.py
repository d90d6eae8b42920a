"""The kernel sharded over 2 gloo processes (torchrun) equals the single-process result.

Float64, 12 steps in 4 checkpoint segments over 2 ranks, SGD with momentum (so the adjoint
carried across the rank boundary matters: without the exact scan the data terms would differ
by the momentum tail, which the test would see at 1e-10).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import explaind_trace
from explaind_kernel import KernelResult, compute_kernel
from explaind_kernel.distributed import split_segments

from .models import MLP

ROOT = Path(__file__).resolve().parents[2]


def make_model() -> nn.Module:
    return MLP().double()


def test_split_segments_is_contiguous_and_balanced() -> None:
    segs = [(0, 3), (3, 6), (6, 9), (9, 12), (12, 13)]
    parts = split_segments(segs, 2)
    assert [s for p in parts for s in p] == segs
    assert parts[0] == [(0, 3), (3, 6), (6, 9)] or parts[0] == [(0, 3), (3, 6)]
    assert split_segments(segs, 8)[0] == [(0, 3)]


def _free_port() -> int:
    """A port nothing listens on now, so parallel test runs do not collide on a fixed one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_equals_single_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    trace = tmp_path / "run.lmdb"
    with explaind_trace.record(model, opt, store=str(trace), checkpoint_every=3):
        for t in range(12):
            opt.zero_grad()
            idx = torch.arange(4 * t, 4 * t + 8) % 40
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    test_x = torch.randn(3, 4, dtype=torch.float64)
    np.save(tmp_path / "x.npy", test_x.numpy())
    single = compute_kernel(str(trace), make_model(), test_x, dtype="float64", progress=False)
    out = tmp_path / "sharded.explaind"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "explaind_kernel",
        str(trace),
        "--model",
        "tests.kernel.test_sharded:make_model",
        "--inputs",
        str(tmp_path / "x.npy"),
        "--dtype",
        "float64",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "completeness: max_abs=" in done.stdout
    sharded = KernelResult.load(out)
    assert sharded.extra["world_size"] == 2
    scale = np.max(np.abs(single.data))
    by_id = dict(zip(single.sample_ids, np.moveaxis(single.data, -1, 0)))
    assert set(sharded.sample_ids) == set(single.sample_ids)
    for j, sid in enumerate(sharded.sample_ids):
        assert np.max(np.abs(sharded.data[:, :, j] - by_id[sid])) <= 1e-10 * scale
    for name in (
        "f0",
        "fT",
        "step_data",
        "step_nondata",
        "step_weight_decay",
        "components",
        "component_data",
        "residual",
        "quadrature_error",
    ):
        a, b = getattr(sharded, name), getattr(single, name)
        # rounding-level terms (non-data here) are compared on the output scale
        assert np.max(np.abs(a - b)) <= 1e-10 * max(np.max(np.abs(b)), np.max(np.abs(single.fT))), (
            name
        )
    assert np.max(np.abs(sharded.completeness_residual)) <= 1e-10 * np.max(np.abs(single.fT))
