"""Joint views sum to their marginals, for several groupings and windowings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from explaind_attr import (
    MissingViewError,
    ViewError,
    component_window_view,
    data_attribution,
    group_component_view,
    group_window_view,
)
from explaind_kernel.result import KeepOptions


def _groupings(result, labels):
    ids = result.sample_ids
    return {
        "none": {},
        "labels": {"groups": labels},
        "callable": {"groups": lambda sid: "low" if sid < "s005" else "high"},
        "series": {"groups": pd.Series({sid: i % 4 for i, sid in enumerate(ids)})},
        "single": {"groups": lambda sid: "all"},
        "own": {"groups": {sid: sid for sid in ids}},
        "default": {"groups": {ids[0]: "first"}, "default_group": "rest"},
    }


GROUPINGS = ["none", "labels", "callable", "series", "single", "own", "default"]


def _param_idx(r):
    return [i for i, k in enumerate(r.component_kinds) if k == "param"]


def _windowed(x, edges):
    return np.add.reduceat(x, np.asarray(edges[:-1]), axis=-1)


@pytest.mark.parametrize("how", GROUPINGS)
def test_group_component_marginals(result, labels, assert_close, how):
    kw = _groupings(result, labels)[how]
    view = group_component_view(result, **kw)
    groups = data_attribution(result, **kw).of_kind("group", "sample")
    assert view.row_labels == groups.labels
    assert_close(view.row_marginal(), groups.values)
    assert_close(view.col_marginal(), result.component_data[..., _param_idx(result)])
    assert_close(view.values.sum(axis=(-1, -2)), result.data.sum(-1))
    frame = view.to_frame()
    assert list(frame.columns) == ["test", "output", "group", "component", "value"]
    assert len(frame) == view.values.size
    assert_close(frame["value"].sum(), result.data.sum())


@pytest.mark.parametrize("how", GROUPINGS)
@pytest.mark.parametrize("coarse", [False, True])
def test_group_window_marginals(result, labels, assert_close, how, coarse):
    kw = _groupings(result, labels)[how]
    edges = [0, result.window_edges[1], result.num_steps] if coarse else None
    view = group_window_view(result, edges=edges, **kw)
    groups = data_attribution(result, **kw).of_kind("group", "sample")
    assert_close(view.row_marginal(), groups.values)
    assert_close(view.col_marginal(), _windowed(result.step_data, view.edges))
    assert view.edges == tuple(edges or result.window_edges)
    frame = view.to_frame()
    assert list(frame.columns) == [
        "test",
        "output",
        "group",
        "window_start",
        "window_stop",
        "value",
    ]
    assert frame["window_stop"].max() == result.num_steps


@pytest.mark.parametrize("edges", [None, "coarse", "one"])
def test_component_window_marginals(result, assert_close, edges):
    e = {
        None: None,
        "coarse": [0, result.window_edges[2], result.num_steps],
        "one": [0, result.num_steps],
    }[edges]
    view = component_window_view(result, edges=e)
    idx = _param_idx(result)
    assert view.row_labels == tuple(result.component_names[i] for i in idx)
    assert_close(view.row_marginal(), result.components[..., idx])
    path = result.step_total - result.step_quadrature_error - result.step_buffer_drift
    assert_close(view.col_marginal(), _windowed(path, view.edges))
    everything = component_window_view(result, edges=e, components="all")
    assert_close(everything.row_marginal(), result.components)
    slices = component_window_view(result, components="slice")
    assert slices.row_labels == ("slice:part0", "slice:part1")
    frame = view.to_frame()
    assert list(frame.columns) == [
        "test",
        "output",
        "component",
        "window_start",
        "window_stop",
        "value",
    ]
    assert_close(frame["value"].sum(), result.components[..., idx].sum())


def test_window_edges_must_be_kept_boundaries(result):
    odd = next(t for t in range(1, result.num_steps) if t not in result.window_edges)
    with pytest.raises(ViewError, match=rf"edges \[{odd}\] are not boundaries of the kept windows"):
        component_window_view(result, edges=[0, odd, result.num_steps])
    with pytest.raises(ViewError, match="must start at 0"):
        group_window_view(result, edges=[0, 5])
    with pytest.raises(ViewError, match="components must be 'param', 'slice' or 'all'"):
        component_window_view(result, components="module")


@pytest.mark.parametrize(
    ("view", "field"),
    [
        (group_component_view, "sample_component"),
        (group_window_view, "sample_window"),
        (component_window_view, "component_window"),
    ],
)
def test_missing_views_name_the_keep_option(synth, view, field):
    r = synth(keep=KeepOptions(component_window=False))
    assert getattr(r, field) is None
    with pytest.raises(MissingViewError, match=rf"recompute with keep=KeepOptions\({field}=True\)"):
        view(r)


def test_arrays_and_frames_agree(result, labels):
    view = group_component_view(result, groups=labels)
    frame = view.to_frame()
    arr = view.to_array()
    row = frame[(frame.test == 1) & (frame.output == "class2") & (frame.group == "1")]
    j = view.col_labels.index(row["component"].iloc[0])
    assert row["value"].iloc[0] == arr[1, 2, view.row_labels.index("1"), j]
