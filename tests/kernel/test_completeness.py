"""Completeness: f(x; θ_0) + every reported term = f(x; θ_T), on the real model output.

fT is the model the training loop left (evaluated here, independently of the trace); the
tolerance is fp32 rounding accumulated over ~200 steps of the sweep: 1e-4 of the output scale
(docs/design.md measured ~4e-7 per step floor in fp32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind_kernel import compute_kernel

from .models import SETUPS, KernelSetup, train

FP32_REL = 1e-4


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
def test_completeness_fp32(setup: KernelSetup) -> None:
    store = f"memory://complete-{setup.name}"
    fresh, test_x, trained = train(setup, store)
    res = compute_kernel(store, fresh, test_x, outputs="all", progress=False)
    trained.eval()
    with torch.no_grad():
        actual = trained(test_x).double().numpy()
    scale = np.max(np.abs(actual))
    # the result's fT is the real final model output
    np.testing.assert_allclose(res.fT, actual, rtol=0, atol=1e-6 * scale)
    # every term adds up
    assert np.max(np.abs(res.completeness_residual)) <= FP32_REL * scale
    # no L2 in the loss, no clipping: the non-data and residual terms are rounding-level
    change = np.max(np.abs(res.fT - res.f0))
    assert np.max(np.abs(res.nondata)) <= 1e-3 * change
    assert np.max(np.abs(res.residual)) <= 1e-3 * change
    # and the data term carries the change
    assert np.max(np.abs(res.data_total)) > 0.1 * change
    assert res.num_steps == setup.steps


def test_clipping_shows_as_nondata() -> None:
    setup = SETUPS[0]
    fresh, test_x, _ = train(setup, "memory://complete-clip", clip=0.01)
    res = compute_kernel("memory://complete-clip", fresh, test_x, progress=False)
    change = np.max(np.abs(res.fT - res.f0))
    # clipping to 0.01 removes most of each gradient: the non-data term is of the size of the data term
    assert np.max(np.abs(res.nondata)) > 0.1 * change
    assert np.max(np.abs(res.completeness_residual)) <= FP32_REL * np.max(np.abs(res.fT))
