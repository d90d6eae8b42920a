"""The engine against the brute-force float64 reference (tests/kernel/reference.py).

Tolerance: 1e-9 relative to the largest magnitude of the compared quantity. Both sides run in
float64 on the same recorded run with the same Gauss–Legendre nodes, so the only differences are
float64 rounding in two different summation orders (backward adjoint vs. forward per-sample
buffers) — orders of magnitude below 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind_kernel import compute_kernel

from .reference import Setup, TinyMLP, run_setup

REL = 1e-9

SETUPS = [
    Setup("sgd_plain", lambda g: torch.optim.SGD(g, lr=0.1)),
    Setup("sgd_momentum", lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9)),
    Setup("sgd_nesterov", lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True)),
    Setup(
        "sgd_dampening_wd",
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.01),
    ),
    Setup("sgd_maximize", lambda g: torch.optim.SGD(g, lr=0.02, momentum=0.5, maximize=True)),
    Setup("adam_coupled_decay", lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.05)),
    Setup("adamw", lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, betas=(0.9, 0.98))),
    Setup("adamw_amsgrad", lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, amsgrad=True)),
    Setup("adam_l2_in_loss", lambda g: torch.optim.Adam(g, lr=0.01), l2=0.05),
    Setup("sgd_clipped", lambda g: torch.optim.SGD(g, lr=0.2, momentum=0.9), clip=0.05),
]


def close(a: np.ndarray, b: np.ndarray) -> None:
    scale = max(float(np.max(np.abs(b))), 1e-300)
    err = float(np.max(np.abs(a - b)))
    assert err <= REL * scale, f"max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
def test_engine_matches_bruteforce(setup: Setup) -> None:
    test_x = torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    store = f"memory://bruteforce-{setup.name}"
    model0, ref = run_setup(setup, store, test_x, nodes=2)
    res = compute_kernel(
        store, TinyMLP().double(), test_x, dtype="float64", quadrature="gauss:2", progress=False
    )
    close(res.f0, ref.f0)
    close(res.fT, ref.fT)
    # per training sample, summed over steps
    eng = {sid: res.data[:, :, j] for j, sid in enumerate(res.sample_ids)}
    assert set(eng) == set(ref.data)
    scale = max(np.max(np.abs(v)) for v in ref.data.values())
    for sid, v in ref.data.items():
        assert np.max(np.abs(eng[sid] - v)) <= REL * scale, sid
    # per step (by the step whose gradient it came from) and per component
    close(res.step_data, ref.step_data)
    for c, name in enumerate(res.component_names):
        close(res.component_data[:, :, c], ref.component_data[name])
    close(res.weight_decay, ref.weight_decay) if np.any(ref.weight_decay) else None
    assert np.max(np.abs(res.nondata - ref.nondata)) <= REL * max(
        np.max(np.abs(ref.nondata)), np.max(np.abs(res.data))
    )
    assert np.max(np.abs(res.quadrature_error - ref.quadrature_error)) <= 1e-12 * np.max(
        np.abs(res.fT)
    )
    # completeness: f0 + every term = fT to float64 rounding
    assert np.max(np.abs(res.completeness_residual)) <= 1e-12 * np.max(np.abs(res.fT))


def test_nondata_is_correctly_sized() -> None:
    """An explicit L2 term in the loss is a non-data gradient; coupled decay is its twin."""
    test_x = torch.randn(3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    lam = 0.05
    a = Setup("l2_loss", lambda g: torch.optim.Adam(g, lr=0.01), l2=lam, scheduler=False)
    b = Setup("l2_decay", lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=lam), scheduler=False)
    run_setup(a, "memory://twin-a", test_x)
    run_setup(b, "memory://twin-b", test_x)
    ra = compute_kernel(
        "memory://twin-a", TinyMLP().double(), test_x, dtype="float64", progress=False
    )
    rb = compute_kernel(
        "memory://twin-b", TinyMLP().double(), test_x, dtype="float64", progress=False
    )
    # the two runs are the same training up to rounding: L2-in-loss shows up as non-data
    assert np.max(np.abs(ra.nondata)) > 1e-6
    np.testing.assert_allclose(ra.nondata, rb.weight_decay, rtol=1e-6, atol=1e-12)
    assert np.max(np.abs(rb.nondata)) <= 1e-12 * np.max(np.abs(rb.fT))
