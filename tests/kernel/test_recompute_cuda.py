"""CUDA: gradients="recompute" on a GPU-trained run (skipped without CUDA; device_check runs it).

The replay runs where training ran (the model's device): forwards, backwards and the recorded
optimizer. θ is compared with the live parameters of every step, bit for bit, and the kernel
result with that of the same run recorded with stored gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import explaind_trace as et
from explaind_kernel import compute_kernel
from tests.trace import trace_helpers as th

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(store: str, mode: str) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = th.MLP(bn=False, p=0.2).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = (t.cuda() for t in th.data())
    thetas = []
    with et.record(model, opt, store=store, gradients=mode, checkpoint_every=4):
        for i in range(8):
            thetas.append({n: p.detach().cpu() for n, p in model.named_parameters()})
            opt.zero_grad()
            idx = torch.arange(8, device="cuda") + 8 * (i % 6)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    thetas.append({n: p.detach().cpu() for n, p in model.named_parameters()})
    return thetas


def test_recompute_on_cuda_rebuilds_theta_bitwise() -> None:
    store = "memory://cuda-recompute"
    thetas = _run(store, "recompute")
    with et.open_trace(store) as trace:
        for rs in trace.replay(model=th.MLP(bn=False, p=0.2).cuda()):
            for n in trace.param_names:
                assert torch.equal(rs.next_params[n], thetas[rs.index + 1][n]), (rs.index, n)


def test_kernel_on_a_cuda_recompute_trace_equals_stored() -> None:
    results = []
    for mode in ("stored", "recompute"):
        store = f"memory://cuda-kernel-{mode}"
        _run(store, mode)
        model = th.MLP(bn=False, p=0.2).cuda()
        results.append(
            compute_kernel(store, model, th.data()[0][:3], progress=False, training_mode="rules")
        )
    for name in ("data", "step_data", "completeness_residual", "fT", "f0"):
        assert np.array_equal(getattr(results[0], name), getattr(results[1], name)), name
