"""DistributedDataParallel with the cotangent codec: every rank's cross-entropy cotangents
(each the local one / world size) are stored as targets and scales, rank 1's from its own
store, and the kernel's results equal those of the same run recorded with the generic codec,
bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import explaind_trace as et
from explaind_kernel import compute_kernel
from explaind_trace import cotangent_codec as cc
from tests.trace import trace_helpers as th

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import explaind_trace as et
from tests.trace import trace_helpers as th

rank, init, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
for cot_codec in ("generic", "auto"):  # the same seeded run twice
    torch.manual_seed(0)
    model = DDP(th.MLP(d_out=20, bn=False, p=0.1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = th.data(n=48, classes=20)
    torch.manual_seed(1 + rank)
    path = f"{folder}/{cot_codec}.lmdb"
    with et.record(model, opt, store=path, checkpoint_every=3, cotangent_codec=cot_codec) as rec:
        for t in range(4):
            shard = ((torch.arange(16) + 16 * t) % 48)[rank::2]
            rec.set_sample_ids(shard.tolist())
            opt.zero_grad()
            F.cross_entropy(model(x[shard]), y[shard]).backward()
            opt.step()
dist.destroy_process_group()
"""


def _ddp_runs(tmp: Path) -> tuple[Path, Path]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    init = f"file://{tmp / 'init'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(r), init, str(tmp)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    return tmp / "generic.lmdb", tmp / "auto.lmdb"


def test_ddp_codec_kernel_equals_the_generic_codecs(tmp_path: Path) -> None:
    generic, auto = _ddp_runs(tmp_path)
    with et.open_trace(auto) as tr:
        fwds = tr.step(1).forwards
        assert [f.rank for f in fwds] == [0, 1]
        assert all(isinstance(f.cotangent, cc.DeferredCotangent) for f in fwds)
    test_x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    kw = dict(progress=False, dtype="float64", training_mode="per_sample", cpu_threads=1)
    a, b = (
        compute_kernel(str(p), th.MLP(d_out=20, bn=False, p=0.1), test_x, **kw)
        for p in (generic, auto)
    )
    assert a.sample_ids == b.sample_ids
    for name in ("f0", "fT", "data", "step_data", "step_nondata", "step_residual", "components"):
        x, y = getattr(a, name), getattr(b, name)
        assert isinstance(x, np.ndarray) and x.tobytes() == y.tobytes(), name
