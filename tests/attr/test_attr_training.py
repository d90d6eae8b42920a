"""Training attribution: steps, windows, cumulative curves, phase boundaries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from explaind_attr import (
    MissingViewError,
    ViewError,
    cumulative_curve,
    phase_boundaries,
    step_attribution,
    step_edges,
)
from explaind_kernel.result import STEP_FIELDS, KeepOptions


@pytest.mark.parametrize("edges", ["steps", "windows", 5, 1, 100, [0, 3, 12], [0, 12]])
def test_every_windowing_adds_up(result, assert_close, edges):
    view = step_attribution(result, edges=edges)
    assert view.edges[0] == 0 and view.edges[-1] == result.num_steps
    assert_close(view.residual, 0.0)
    assert_close(view.per_window.sum(-1), result.fT - result.f0)
    assert_close(view.cumulative()[..., -1], result.fT - result.f0)
    frame = view.to_frame()
    assert list(frame.columns) == ["test", "output", "window_start", "window_stop", "term", "value"]
    assert len(frame) == result.num_inputs * result.num_outputs * (len(view.edges) - 1) * 7


def test_per_step_values_are_the_step_fields(result):
    view = step_attribution(result)
    assert view.terms == tuple(f.removeprefix("step_") for f in STEP_FIELDS)
    for f, name in enumerate(STEP_FIELDS):
        np.testing.assert_array_equal(view.values[..., f], getattr(result, name))


def test_step_edges_choices(result):
    assert step_edges(result, "windows") == tuple(result.window_edges)
    assert step_edges(result, 5) == (0, 5, 10, 12)
    with pytest.raises(ViewError, match=r"start at 0 and end at the number of steps T=12"):
        step_edges(result, [1, 12])
    with pytest.raises(ViewError, match="strictly increasing"):
        step_edges(result, [0, 5, 5, 12])
    with pytest.raises(ViewError, match="window length must be ≥ 1"):
        step_edges(result, 0)
    with pytest.raises(ViewError, match="edges must be 'steps', 'windows'"):
        step_edges(result, "epochs")
    with pytest.raises(ViewError, match="must be integers"):
        step_edges(result, [0, "a", 12])


def test_cumulative_curve_runs_from_f0_to_fT(result, assert_close):
    curve = cumulative_curve(result)
    assert list(curve.columns) == ["test", "output", "step", "value"]
    first = curve[curve.step == 0]["value"].to_numpy().reshape(result.f0.shape)
    last = curve[curve.step == result.num_steps]["value"].to_numpy().reshape(result.f0.shape)
    np.testing.assert_array_equal(first, result.f0)
    assert_close(last, result.fT)
    by_term = cumulative_curve(result, edges="windows", by_term=True)
    assert list(by_term.columns) == ["test", "output", "step", "term", "value"]
    end = by_term[by_term.step == result.num_steps]
    assert_close(end[end.term == "data"]["value"].to_numpy(), result.data.sum(-1).reshape(-1))
    assert_close(
        end.groupby(["test", "output"])["value"].sum().to_numpy(),
        (result.fT - result.f0).reshape(-1),
    )


def _with_steps(result, change):
    """A result whose measured per-step change is `change` [N, O, T] (all in step_data)."""
    zeros = np.zeros_like(change)
    fields = {name: zeros for name in STEP_FIELDS}
    fields["step_data"] = change
    return dataclasses.replace(result, **fields)


def test_sign_rule_finds_flips_of_the_smoothed_change(synth):
    r = synth(N=1, O=2, T=12)
    change = np.zeros((1, 2, 12))
    change[0, 0] = [1, 1, 1, 1, 0, 0, -1, -1, -1, 2, 2, 2]  # zeros carry the + sign
    change[0, 1] = [-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1]  # noise
    table = phase_boundaries(_with_steps(r, change), smooth=1)
    assert list(table.columns) == ["test", "output", "step", "rule", "before", "after"]
    row0 = table[table.output == "class0"]
    assert row0["step"].tolist() == [6, 9]
    assert row0["before"].tolist() == ["+", "-"] and row0["after"].tolist() == ["-", "+"]
    assert len(table[table.output == "class1"]) == 11
    smoothed = phase_boundaries(_with_steps(r, change), smooth=2)
    assert len(smoothed[smoothed.output == "class1"]) == 0  # pairs cancel: all-zero, no flip
    debounced = phase_boundaries(_with_steps(r, change), smooth=1, min_gap=4)
    assert debounced[debounced.output == "class1"]["step"].tolist() == [1, 5, 9]


def test_dominant_rule_follows_component_window(synth):
    r = synth(N=1, O=1, C=3, T=12, W=3)
    cw = np.zeros_like(r.component_window)
    cw[0, 0, 0, 0] = 5.0  # window 0: tensor 0
    cw[0, 0, 1, 1] = -7.0  # window 1: tensor 1 (by |value|)
    cw[0, 0, 1, 2] = 1.0  # window 2: tensor 1 again
    cw[0, 0, 3, 2] = 99.0  # a slice never dominates: only parameter tensors count
    table = phase_boundaries(dataclasses.replace(r, component_window=cw), rule="dominant")
    names = r.component_names
    assert table["step"].tolist() == [r.window_edges[1]]
    assert table["before"].tolist() == [names[0]] and table["after"].tolist() == [names[1]]


def test_phase_errors(synth):
    r = synth(keep=KeepOptions(component_window=False))
    with pytest.raises(MissingViewError, match=r"keep=KeepOptions\(component_window=True\)"):
        phase_boundaries(r, rule="dominant")
    with pytest.raises(ViewError, match="rule must be 'sign' or 'dominant'"):
        phase_boundaries(r, rule="loss")
    with pytest.raises(ViewError, match="smooth must be a positive number"):
        phase_boundaries(r, smooth=0)
    with pytest.raises(ViewError, match="min_gap must be a positive number"):
        phase_boundaries(r, min_gap=0)
