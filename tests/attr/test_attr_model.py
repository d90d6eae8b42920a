"""Model attribution: parameter tensors, modules, slices, influence scores."""

from __future__ import annotations

import numpy as np
import pytest

from explaind_attr import (
    MissingViewError,
    ViewError,
    component_attribution,
    module_attribution,
    module_of,
    param_score_table,
    param_score_vector,
    param_scores,
    slice_attribution,
)
from explaind_kernel.result import KeepOptions


def test_components_plus_special_rows_add_up(result, assert_close):
    view = component_attribution(result)
    names = [n for n, k in zip(result.component_names, result.component_kinds) if k == "param"]
    assert view.labels == (*names, "quadrature_error", "buffer_drift")
    assert view.kinds[-2:] == ("term", "term")
    assert_close(view.residual, 0.0)
    assert_close(view.values.sum(-1), result.fT - result.f0)
    frame = view.to_frame()
    assert list(frame.columns) == ["test", "output", "component", "kind", "value"]
    assert_close(frame["value"].sum(), (result.fT - result.f0).sum())


def test_data_part_of_components_adds_up_to_data(result, assert_close):
    view = component_attribution(result, part="data")
    assert "quadrature_error" not in view.labels
    assert_close(view.residual, 0.0)
    assert_close(view.values.sum(-1), result.data.sum(-1))
    with pytest.raises(ViewError, match="part must be 'all' or 'data'"):
        component_attribution(result, part="slices")


def test_module_of():
    assert module_of("encoder.layer.0.attn.weight") == "encoder.layer.0.attn"
    assert module_of("encoder.layer.0.attn.weight", level=1) == "encoder"
    assert module_of("encoder.layer.0.attn.weight", level=3) == "encoder.layer.0"
    assert module_of("encoder.layer.0.attn.weight", level=9) == "encoder.layer.0.attn"
    assert module_of("scale") == "(root)"
    assert module_of("scale", level=1) == "(root)"


@pytest.mark.parametrize("level", [None, 1, 2])
def test_modules_sum_their_tensors_and_add_up(synth, assert_close, level):
    r = synth(C=6)
    view = module_attribution(r, level=level)
    assert_close(view.residual, 0.0)
    comps = component_attribution(r)
    modules = [lab for lab, k in zip(view.labels, view.kinds) if k == "module"]
    expected = {
        None: ["net.layer0", "net.layer1", "net.layer2", "(root)"],
        1: ["net", "(root)"],
        2: ["net.layer0", "net.layer1", "net.layer2", "(root)"],
    }[level]
    assert modules == expected
    for m in modules:
        members = [
            i
            for i, (lab, k) in enumerate(zip(comps.labels, comps.kinds))
            if k == "param" and module_of(lab, level) == m
        ]
        assert_close(view.values[..., view.labels.index(m)], comps.values[..., members].sum(-1))
    with pytest.raises(ViewError, match="level must be None or an integer ≥ 1"):
        module_attribution(r, level=0)


def test_slices_have_no_total(result):
    view = slice_attribution(result)
    assert view.labels == ("part0", "part1")
    assert view.total is None and view.residual is None and view.max_residual() == 0.0
    idx = [i for i, k in enumerate(result.component_kinds) if k == "slice"]
    np.testing.assert_array_equal(view.values, result.components[..., idx])
    np.testing.assert_array_equal(
        slice_attribution(result, part="data").values, result.component_data[..., idx]
    )
    assert list(view.to_frame().columns) == ["test", "output", "slice", "kind", "value"]


def test_no_slices_is_an_error(synth):
    with pytest.raises(ViewError, match="no user slices; pass slices to compute_kernel"):
        slice_attribution(synth(n_slices=0))


def test_param_scores_as_arrays_and_tables(result):
    scores = param_scores(result)
    names = [n for n, k in zip(result.component_names, result.component_kinds) if k == "param"]
    assert list(scores) == names
    vec = param_score_vector(result)
    assert vec.shape == (sum(v.size for v in scores.values()),)
    per_tensor = param_score_table(result)
    assert list(per_tensor.columns) == ["param", "numel", "total", "mean", "max", "share"]
    np.testing.assert_allclose(per_tensor["share"].sum(), 1.0)
    per_el = param_score_table(result, per="element")
    assert len(per_el) == vec.size
    np.testing.assert_array_equal(per_el["score"].to_numpy(), vec)
    best = per_el.sort_values("rank").iloc[0]
    assert best["score"] == vec.max() and best["rank"] == 1
    sub = param_scores(result, names=names[:1])
    assert list(sub) == names[:1]
    with pytest.raises(ViewError, match=r"no influence scores for \['nope'\]"):
        param_scores(result, names=["nope"])
    with pytest.raises(ViewError, match="per must be 'tensor' or 'element'"):
        param_score_table(result, per="module")


def test_missing_param_scores_names_the_keep_option(synth):
    r = synth(keep=KeepOptions())
    with pytest.raises(MissingViewError, match=r"keep=KeepOptions\(param_scores=True\)"):
        param_scores(r)
