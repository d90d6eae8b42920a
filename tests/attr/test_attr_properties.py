"""Property test: for any shapes, every view adds up to the kernel result's totals."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explaind_attr import (
    component_attribution,
    component_window_view,
    data_attribution,
    group_component_view,
    group_window_view,
    module_attribution,
    step_attribution,
)

from .conftest import ATOL, make_result


@st.composite
def shapes(draw):
    t = draw(st.integers(1, 8))
    return dict(
        N=draw(st.integers(1, 3)),
        O=draw(st.integers(1, 3)),
        S=draw(st.integers(1, 9)),
        C=draw(st.integers(1, 5)),
        T=t,
        W=draw(st.integers(1, t)),
        seed=draw(st.integers(0, 2**16)),
        n_slices=draw(st.integers(0, 2)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes(), n_groups=st.integers(1, 4), every=st.integers(1, 4))
def test_views_add_up_for_any_shape(shape, n_groups, every):
    r = make_result(**shape)
    total = r.fT - r.f0
    groups = {sid: i % n_groups for i, sid in enumerate(r.sample_ids)}

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)

    for view in (
        data_attribution(r),
        data_attribution(r, groups=groups),
        component_attribution(r),
        module_attribution(r, level=1),
    ):
        close(view.values.sum(-1), total)
    close(step_attribution(r, edges=every).values.sum(axis=(-1, -2)), total)
    gc = group_component_view(r, groups=groups)
    close(gc.values.sum(axis=(-1, -2)), r.data.sum(-1))
    gw = group_window_view(r, groups=groups)
    close(gw.values.sum(axis=(-1, -2)), r.data.sum(-1))
    cw = component_window_view(r, edges=[0, r.num_steps])
    close(cw.values.sum(axis=(-1, -2)) + r.quadrature_error + r.buffer_drift, total)
