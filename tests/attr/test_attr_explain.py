"""One prediction at a time (`explain`), the tidy result table (`KernelResult.to_frame`) and
self-influence (the kernel on the training inputs, read on the diagonal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind_attr import ViewError, explain, self_influence, self_influence_of
from explaind_kernel import compute_kernel
from explaind_kernel.result import TERM_FIELDS
from tests.kernel.reference import Setup, TinyMLP, run_setup

from .conftest import ATOL


@pytest.mark.parametrize("i", [0, 1])
def test_explanation_adds_up_to_the_results_totals(synth, i) -> None:
    r = synth(N=2, O=3, S=10)
    for j, name in enumerate(r.output_names):
        e = explain(r, i, output=name, k=4)
        assert (e.index, e.output, e.f0, e.fT) == (i, name, r.f0[i, j], r.fT[i, j])
        terms = dict(zip(e.terms["term"], e.terms["value"]))
        assert terms["data"] == pytest.approx(r.data[i, j].sum(), abs=ATOL)
        for t in TERM_FIELDS:
            assert terms[t] == getattr(r, t)[i, j]
        # f0 + data + every term + what is left = fT
        assert abs(e.terms["value"].to_numpy()[:-1].sum() - r.fT[i, j]) <= ATOL
        assert abs(e.steps["change"].sum() - (r.fT[i, j] - r.f0[i, j])) <= ATOL
        assert abs(e.modules["value"].sum() - (r.fT[i, j] - r.f0[i, j])) <= ATOL
        assert e.check() <= ATOL
        # proponents / opponents are the strongest positive / negative samples, in order
        d = r.data[i, j]
        pos = sorted((v for v in d if v > 0), reverse=True)[:4]
        neg = sorted(v for v in d if v < 0)[:4]
        assert e.proponents["value"].tolist() == pos and e.opponents["value"].tolist() == neg
        sid = e.proponents["sample"].iloc[0]
        assert d[r.sample_ids.index(sid)] == pos[0]
        # the windows of largest change are the result's windows, ranked by |change|
        w = np.add.reduceat(r.step_total[i, j], np.asarray(r.window_edges[:-1]))
        assert abs(e.windows["change"].iloc[0]) == pytest.approx(np.abs(w).max(), abs=ATOL)


def test_explanation_shows_input_label_prediction_and_html(synth) -> None:
    r = synth(N=2, O=3, S=6)
    r.extra.update(labels=np.array([2, 0]), predicted=np.array([1, 0]), target="all")
    images = torch.rand(2, 1, 5, 5)
    samples = {sid: torch.arange(4) + k for k, sid in enumerate(r.sample_ids)}
    e = explain(r, 0, inputs=images, samples=samples, train_labels={r.sample_ids[0]: 7})
    assert e.output == "class1"  # outputs="all": the predicted class by default
    assert (e.label, e.predicted) == (2, 1)
    assert e.input.shape == (1, 5, 5)
    pair = explain(r, 1, inputs=(images, torch.tensor([2, 0])))  # an (x, y) pair: x is shown
    assert np.array_equal(pair.input, images[1].numpy())
    html = e._repr_html_()
    assert "label 2, predicted 1" in html and "<img src='data:image/png;base64," in html
    assert "Proponents" in html and "tokens:" in html  # training rows shown as tokens
    with pytest.raises(ViewError, match="i must be a test input index in 0..1"):
        explain(r, 2)
    with pytest.raises(ViewError, match="output 'nope' is not one of"):
        explain(r, 0, output="nope")


def test_to_frame_is_tidy_and_adds_up(synth) -> None:
    r = synth(N=3, O=2)
    r.extra["labels"] = np.array([1, 0, 1])
    f = r.to_frame()
    assert len(f) == 6 and list(f.columns[:3]) == ["test", "output", "label"]
    assert f["label"].tolist() == [1, 1, 0, 0, 1, 1]
    parts = f[["f0", "data", *TERM_FIELDS, "completeness_residual"]].sum(axis=1)
    np.testing.assert_allclose(parts, f["fT"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(f["fT"].to_numpy().reshape(3, 2), r.fT)


def test_self_influence_is_the_diagonal_of_the_full_kernel() -> None:
    """Against the float64 brute force (reference.py) at 1e-9, and against a full kernel on
    the training inputs computed directly."""
    setup = Setup("selfinf", lambda g: torch.optim.Adam(g, lr=0.02), steps=8)
    gen = torch.Generator().manual_seed(setup.seed + 1)  # reference.py's training data
    X = torch.randn(setup.samples, 3, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 3, (setup.samples,), generator=gen)
    store = "memory://attr-self-influence"

    def loss(out):
        return torch.nn.functional.cross_entropy(out, Y, reduction="none")

    _, ref = run_setup(setup, store, X, target=loss)
    labels = {str(i): int(Y[i]) for i in range(setup.samples)}
    kw = dict(dtype="float64", progress=False, training_mode="per_sample")
    table, res = self_influence(store, TinyMLP().double(), labels=labels, **kw)
    assert res.output_names == ["loss (cross-entropy)"]
    assert table["self_influence"].is_monotonic_decreasing and table["rank"].iloc[0] == 1
    scale = max(np.max(np.abs(v)) for v in ref.data.values())
    got = dict(zip(table["sample"], table["self_influence"]))
    assert set(got) == set(ref.data)
    for sid, v in got.items():
        assert abs(v - ref.data[sid][int(sid), 0]) <= 1e-9 * scale, sid
    # the same numbers as the diagonal of a kernel on all training inputs, in id order
    ids = [str(i) for i in range(setup.samples)]
    full = compute_kernel(store, TinyMLP().double(), X, outputs="loss", labels=Y, **kw)
    diag = {sid: full.data[int(sid), 0, full.sample_ids.index(sid)] for sid in ids}
    for sid in ids:
        assert abs(got[sid] - diag[sid]) <= 1e-12 * scale
    assert self_influence_of(full, ids)["self_influence"].tolist() == sorted(
        diag.values(), reverse=True
    )
