"""CUDA: the engine on a GPU matches the CPU engine (float64) and the brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind_kernel import compute_kernel

from .reference import Setup, TinyMLP, run_setup

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype,rel", [("float64", 1e-9), ("float32", 1e-4)])
def test_cuda_matches_reference(dtype: str, rel: float) -> None:
    setup = Setup("cuda_adamw", lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1))
    test_x = torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, ref = run_setup(setup, "memory://cuda-adamw", test_x)
    res = compute_kernel(
        "memory://cuda-adamw",
        TinyMLP().double(),
        test_x,
        dtype=dtype,
        device="cuda",
        progress=False,
    )
    assert res.extra["device"].startswith("cuda")
    scale = max(np.max(np.abs(v)) for v in ref.data.values())
    for j, sid in enumerate(res.sample_ids):
        assert np.max(np.abs(res.data[:, :, j] - ref.data[sid])) <= rel * scale
    assert np.max(np.abs(res.completeness_residual)) <= rel * np.max(np.abs(res.fT))
