"""The synthetic results obey every identity a real KernelResult does."""

from __future__ import annotations

import numpy as np
import pytest

from explaind_kernel.result import STEP_FIELDS, TERM_FIELDS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_result_is_complete(synth, assert_close, seed):
    r = synth(N=3, O=2, S=7, C=5, T=9, W=4, seed=seed)
    assert_close(r.completeness_residual, 0.0)
    params = [i for i, k in enumerate(r.component_kinds) if k == "param"]
    assert_close(
        r.components[..., params].sum(-1) + r.quadrature_error + r.buffer_drift, r.fT - r.f0
    )
    assert_close(r.step_data.sum(-1), r.data.sum(-1))
    for step_name, name in zip(STEP_FIELDS[1:], TERM_FIELDS):
        assert_close(getattr(r, step_name).sum(-1), getattr(r, name))
    assert_close(r.step_total.sum(-1), r.fT - r.f0)
    assert_close(r.component_data[..., params].sum(-1), r.data.sum(-1))
    assert_close(r.sample_component.sum(-1), r.data)
    assert_close(r.sample_window.sum(-1), r.data)
    assert_close(r.component_window.sum(-1), r.components)
    assert r.window_edges[0] == 0 and r.window_edges[-1] == r.num_steps
    assert len(r.window_edges) == 5 and np.all(np.diff(r.window_edges) > 0)
