"""Pruning curves on a small trained MLP: copies only, reproducible, exact counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from explaind_attr import (
    MissingViewError,
    PruningError,
    prune_copy,
    prune_curve,
    prune_curves,
    ranking_scores,
)
from explaind_kernel.result import KeepOptions


@pytest.fixture(scope="module")
def trained():
    """A 2-16-2 MLP trained for 300 Adam steps on two Gaussian blobs, and its data."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 2, generator=g) + 1.5, torch.randn(100, 2, generator=g) - 1.5])
    y = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, x, y


def _evaluate(x, y):
    def evaluate(m):
        with torch.no_grad():
            return float((m(x).argmax(-1) == y).float().mean())

    return evaluate


def _loss_fn(x, y):
    return lambda m: torch.nn.functional.cross_entropy(m(x), y)


def _influence(model, seed=1):
    """Stand-in influence scores of the right shapes (|θ| times noise)."""
    rng = np.random.default_rng(seed)
    return {
        n: np.abs(p.detach().numpy()) * rng.random(p.shape) for n, p in model.named_parameters()
    }


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sparsity_zero_is_the_unpruned_metric_and_model_is_untouched(trained):
    model, x, y = trained
    before = _state(model)
    evaluate = _evaluate(x, y)
    base = evaluate(model)
    assert base > 0.9
    for method in ("scores", "magnitude", "taylor"):
        curve = prune_curve(
            model,
            _influence(model),
            [0.0, 0.5, 1.0],
            evaluate,
            method=method,
            loss_fn=_loss_fn(x, y),
            progress=False,
        )
        assert curve.metrics[0] == base
        assert curve.pruned == (0, curve.eligible // 2, curve.eligible)
        assert curve.eligible == sum(p.numel() for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["scores", "magnitude", "taylor"])
def test_curves_are_reproducible(trained, method):
    model, x, y = trained
    kw = dict(method=method, loss_fn=_loss_fn(x, y), progress=False)
    sparsities = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
    a = prune_curve(model, _influence(model), sparsities, _evaluate(x, y), **kw)
    b = prune_curve(model, _influence(model), sparsities, _evaluate(x, y), **kw)
    assert a == b
    assert a.to_frame()["metric"].tolist() == list(a.metrics)


def test_counts_and_masked_out_entries(trained):
    model, x, y = trained
    names = ["0.weight", "2.weight"]
    mask = {"0.weight": torch.rand(16, 2, generator=torch.Generator().manual_seed(3)) > 0.5}
    eligible = int(mask["0.weight"].sum()) + model[2].weight.numel()
    original = dict(model.named_parameters())
    seen = []

    def evaluate(m):
        params = dict(m.named_parameters())
        for n in ("0.bias", "2.bias"):  # not chosen: never touched
            assert torch.equal(params[n], original[n])
        keep = ~mask["0.weight"]
        assert torch.equal(params["0.weight"][keep], original["0.weight"][keep])
        zeros = int((params["0.weight"][mask["0.weight"]] == 0).sum())
        zeros += int((params["2.weight"] == 0).sum())
        seen.append(zeros)
        return 0.0

    sparsities = [0.0, 0.13, 0.25, 0.5, 0.77, 1.0]
    curve = prune_curve(
        model, _influence(model), sparsities, evaluate, params=names, mask=mask, progress=False
    )
    assert curve.eligible == eligible
    expected = [round(s * eligible) for s in sparsities]
    assert list(curve.pruned) == expected
    assert seen == expected


def test_lowest_scores_go_first_and_ties_are_stable(trained):
    model, _, _ = trained
    flat = {n: np.ones(p.shape) for n, p in model.named_parameters()}
    flat["2.bias"] = np.array([5.0, 0.5])
    pruned = prune_copy(model, flat, 3 / sum(p.numel() for p in model.parameters()))
    params = dict(pruned.named_parameters())
    assert params["2.bias"][1] == 0 and params["2.bias"][0] != 0
    w = params["0.weight"].reshape(-1)
    assert (w[:2] == 0).all() and (w[2:] != 0).all()  # equal scores: first positions first


def test_scores_from_a_kernel_result(trained, synth):
    model, x, y = trained
    influence = _influence(model)
    r = dataclasses.replace(synth(), param_scores=influence)
    a = prune_curve(model, r, [0.2, 0.6], _evaluate(x, y), progress=False)
    b = prune_curve(model, influence, [0.2, 0.6], _evaluate(x, y), progress=False)
    assert a == b
    with pytest.raises(MissingViewError, match=r"KeepOptions\(param_scores=True\)"):
        prune_curve(model, synth(keep=KeepOptions()), [0.1], _evaluate(x, y))


def test_baselines_rank_by_magnitude_and_taylor(trained):
    model, x, y = trained
    mag = ranking_scores(model, None, method="magnitude")
    np.testing.assert_array_equal(mag["0.weight"], model[0].weight.detach().abs().double().numpy())
    tay = ranking_scores(model, None, method="taylor", loss_fn=_loss_fn(x, y))
    w = model[0].weight
    (g,) = torch.autograd.grad(_loss_fn(x, y)(model), [w])
    np.testing.assert_allclose(tay["0.weight"], (w * g).abs().detach().double().numpy(), rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    frame = prune_curves(
        model,
        _influence(model),
        [0.0, 0.5],
        _evaluate(x, y),
        loss_fn=_loss_fn(x, y),
        progress=False,
    )
    assert frame["method"].tolist() == ["scores"] * 2 + ["magnitude"] * 2 + ["taylor"] * 2


def test_pruning_errors(trained):
    model, x, y = trained
    ev = _evaluate(x, y)
    scores = _influence(model)
    with pytest.raises(PruningError, match=r"sparsities must be numbers in \[0, 1\]"):
        prune_curve(model, scores, [0.5, 1.5], ev)
    with pytest.raises(PruningError, match="needs loss_fn"):
        prune_curve(model, scores, [0.5], ev, method="taylor")
    with pytest.raises(PruningError, match="unknown pruning method 'random'"):
        prune_curve(model, scores, [0.5], ev, method="random")
    with pytest.raises(PruningError, match="needs scores"):
        prune_curve(model, None, [0.5], ev)
    with pytest.raises(PruningError, match=r"no scores for parameters \['2.bias'\]"):
        prune_curve(model, {k: v for k, v in scores.items() if k != "2.bias"}, [0.5], ev)
    with pytest.raises(PruningError, match=r"the scores of '0.bias' have shape \(3,\)"):
        prune_curve(model, {**scores, "0.bias": np.ones(3)}, [0.5], ev)
    with pytest.raises(PruningError, match="NaN or infinite"):
        prune_curve(model, {**scores, "0.bias": np.full(16, np.nan)}, [0.5], ev)
    with pytest.raises(PruningError, match=r"the model has no parameters \['head.weight'\]"):
        prune_curve(model, scores, [0.5], ev, params=["head.weight"])
    with pytest.raises(PruningError, match=r"the mask of '0.bias' has shape \(2,\)"):
        prune_curve(model, scores, [0.5], ev, mask={"0.bias": np.ones(2, bool)})
    with pytest.raises(PruningError, match="mask names"):
        prune_curve(model, scores, [0.5], ev, params=["0.bias"], mask={"2.bias": np.ones(2, bool)})
    with pytest.raises(PruningError, match="evaluate\\(model\\) must return a number"):
        prune_curve(model, scores, [0.5], lambda m: "high")
