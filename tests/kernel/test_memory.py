"""Peak memory of the kernel does not grow with the training set (same steps, same batch).

Runs of 32 steps × batch 64 over a pool of S = 1024 or 2048 samples (epochs of random
permutations), so the larger run sees twice as many distinct samples. An implementation that
keeps anything per (training sample × parameter) — upstream's per-sample momentum buffers — needs
1024 × 66k × 4 bytes ≈ 270 MB more for the larger run. The sweep keeps one adjoint per explained
row and `block_rows` per-sample gradients of one batch at a time (the issue's O(K·P + outputs·P +
batch·P) bound), so the two peaks must agree to within allocator noise (we allow 60 MB).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import explaind_trace

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_GROWTH_MB = 60

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from tests.kernel.test_memory import Wide
from explaind_kernel import compute_kernel
torch.set_num_threads(1)
res = compute_kernel({trace!r}, Wide(), torch.randn(2, 64), outputs="predicted", progress=False,
                     prefetch=False, block_rows=32)
print(json.dumps({{"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "samples": len(res.sample_ids),
                   "rel": res.completeness()[1]}}))
"""


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _peak(tmp: Path, samples: int) -> dict:
    torch.manual_seed(0)
    model = Wide()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(samples, 64), torch.randint(0, 2, (samples,))
    trace = str(tmp / f"s{samples}.lmdb")
    order = torch.cat([torch.randperm(samples) for _ in range(2048 // samples)])
    with explaind_trace.record(model, opt, store=trace, checkpoint_every=8):
        for t in range(32):
            idx = order[64 * t : 64 * (t + 1)]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), trace=trace)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_independent_of_training_set(tmp_path: Path) -> None:
    small = _peak(tmp_path, 1024)
    large = _peak(tmp_path, 2048)
    assert small["samples"] == 1024 and large["samples"] == 2048
    assert small["rel"] < 1e-4 and large["rel"] < 1e-4
    growth_mb = (large["peak_kb"] - small["peak_kb"]) / 1024
    assert growth_mb < ALLOWED_GROWTH_MB, f"peak grew by {growth_mb:.0f} MB: {small} -> {large}"
