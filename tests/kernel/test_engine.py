"""Engine features and bad input, on short float64 runs (exact comparisons at 1e-10)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import explaind_trace
from explaind_kernel import (
    EmptyTraceError,
    InputError,
    KeepOptions,
    KernelResult,
    ModelMismatchError,
    UnsupportedOptimizerError,
    compute_kernel,
)

from .models import MLP, SETUPS, BNConvNet, KernelSetup, train

EXACT = 1e-10  # float64 on both sides, same arithmetic up to summation order


def _mlp64(steps: int = 12) -> KernelSetup:
    return KernelSetup(
        "mlp64",
        lambda: MLP().double(),
        lambda g: (
            lambda x: (x, (x[:, 0] > 0).long(), torch.randn(4, 4, generator=g, dtype=torch.float64))
        )(torch.randn(24, 4, generator=g, dtype=torch.float64)),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
        steps=steps,
        batch=6,
    )


@pytest.fixture(scope="module")
def run64():
    setup = _mlp64()
    fresh, test_x, trained = train(setup, "memory://engine-mlp64")
    return "memory://engine-mlp64", fresh, test_x, trained


def _k(run, **kw) -> KernelResult:
    store, fresh, test_x, _ = run
    kw.setdefault("dtype", "float64")
    kw.setdefault("progress", False)
    return compute_kernel(store, fresh, test_x, **kw)


def _close(a, b, scale=None) -> None:
    scale = scale if scale is not None else max(np.max(np.abs(b)), 1e-300)
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= EXACT * scale


def test_chunked_inputs_give_the_same_result(run64) -> None:
    whole = _k(run64)
    chunked = _k(run64, memory_budget=1)  # one test input per chunk
    for name in ("f0", "fT", "data", "step_data", "components", "component_data", "nondata"):
        _close(getattr(chunked, name), getattr(whole, name), np.max(np.abs(whole.fT)))
    assert chunked.sample_ids == whole.sample_ids


def test_output_modes_are_rows_of_all(run64) -> None:
    """The kernel is linear in the explained function: every mode is a row or a combination."""
    full = _k(run64)
    pred = _k(run64, outputs="predicted")
    idx = full.fT.argmax(1)
    rows = np.arange(len(idx))
    _close(pred.data[:, 0], full.data[rows, idx], np.max(np.abs(full.data)))
    labels = np.array([2, 0, 1, 1])
    lab = _k(run64, outputs="label", labels=labels)
    _close(lab.data[:, 0], full.data[rows, labels], np.max(np.abs(full.data)))
    margin = _k(run64, outputs=lambda y: y[:, 0] - y[:, 1], output_names=["margin01"])
    _close(margin.data[:, 0], full.data[:, 0] - full.data[:, 1], np.max(np.abs(full.data)))
    assert margin.output_names == ["margin01"]
    _close(margin.fT[:, 0], full.fT[:, 0] - full.fT[:, 1])


def test_slices_partition_their_tensor(run64) -> None:
    name = "net.0.weight"  # [8, 4]
    res = _k(run64, slices={"rows0-3": (name, slice(0, 4)), "rows4-7": (name, slice(4, 8))})
    c = res.component_names
    assert c[-2:] == ["slice:rows0-3", "slice:rows4-7"]
    assert res.component_kinds[-2:] == ["slice", "slice"]
    whole = res.components[:, :, c.index(name)]
    _close(res.components[:, :, -2] + res.components[:, :, -1], whole, np.max(np.abs(whole)))
    wd = res.component_data[:, :, c.index(name)]
    _close(res.component_data[:, :, -2] + res.component_data[:, :, -1], wd, np.max(np.abs(wd)))


def test_components_partition_the_path(run64) -> None:
    res = _k(run64)
    params = [i for i, k in enumerate(res.component_kinds) if k == "param"]
    path = res.components[:, :, params].sum(-1) + res.quadrature_error + res.buffer_drift
    _close(path, res.fT - res.f0, np.max(np.abs(res.fT)))


def test_joint_slices_sum_to_their_marginals(run64) -> None:
    res = _k(
        run64,
        keep=KeepOptions(
            sample_component=True, sample_window=True, component_window=True, param_scores=True
        ),
        step_windows=3,
    )
    assert res.window_edges == [0, 4, 8, 12]
    scale = np.max(np.abs(res.data))
    _close(res.sample_component.sum(-1), res.data, scale)
    _close(res.sample_window.sum(-1), res.data, scale)
    _close(res.component_window.sum(-1), res.components, np.max(np.abs(res.components)))
    _close(
        res.sample_component.sum(2),
        res.component_data[:, :, : len(res.sample_component[0, 0, 0])],
        scale,
    )
    for j in range(3):
        a, b = res.window_edges[j], res.window_edges[j + 1]
        _close(res.sample_window[..., j].sum(-1), res.step_data[..., a:b].sum(-1), scale)
    assert set(res.param_scores) == set(
        n for n, k in zip(res.component_names, res.component_kinds) if k == "param"
    )
    assert res.param_scores["net.0.weight"].shape == (8, 4)
    assert np.all(res.param_scores["net.0.weight"] >= 0) and np.any(
        res.param_scores["net.0.weight"] > 0
    )


def test_step_terms_sum_to_totals(run64) -> None:
    res = _k(run64)
    _close(res.step_data.sum(-1), res.data.sum(-1), np.max(np.abs(res.data)))
    for term in ("weight_decay", "nondata", "residual", "quadrature_error", "buffer_drift"):
        _close(getattr(res, f"step_{term}").sum(-1), getattr(res, term), 1.0)
    _close(
        res.step_total.sum(-1), res.fT - res.f0 - res.completeness_residual, np.max(np.abs(res.fT))
    )


def test_adaptive_quadrature_raises_nodes_where_needed(run64) -> None:
    one = _k(run64, quadrature="gauss:1")
    tol = float(np.max(np.abs(one.step_quadrature_error))) / 10
    ada = _k(run64, quadrature="gauss:1", adaptive_tol=tol, max_nodes=64)
    assert ada.step_nodes.max() > 1 and ada.step_nodes.min() >= 1
    assert np.max(np.abs(ada.step_quadrature_error)) <= tol
    # more nodes, smaller error; midpoint is a registered rule too
    three = _k(run64, quadrature="gauss:3")
    mid = _k(run64, quadrature="midpoint:10")
    assert np.max(np.abs(three.quadrature_error)) < np.max(np.abs(one.quadrature_error))
    assert np.max(np.abs(mid.quadrature_error)) > np.max(np.abs(three.quadrature_error))


def test_result_roundtrip(tmp_path, run64) -> None:
    res = _k(run64, keep=KeepOptions(sample_component=True, param_scores=True))
    path = res.save(tmp_path / "r.explaind")
    back = KernelResult.load(path)
    assert back.sample_ids == res.sample_ids and back.trace_id == res.trace_id
    np.testing.assert_array_equal(back.data, res.data)
    np.testing.assert_array_equal(
        back.param_scores["net.0.weight"], res.param_scores["net.0.weight"]
    )
    assert back.config["dtype"] == "float64"
    assert back.completeness_line() == res.completeness_line()


def test_batchnorm_buffer_drift_is_reported() -> None:
    setup = KernelSetup("bn", BNConvNet, SETUPS[1].make_data, SETUPS[1].make_opt, steps=20)
    fresh, test_x, trained = train(setup, "memory://engine-bn")
    res = compute_kernel("memory://engine-bn", fresh, test_x, progress=False)
    # running statistics change over training, and that change is its own term
    assert np.max(np.abs(res.buffer_drift)) > 1e-4 * np.max(np.abs(res.fT - res.f0))
    assert np.max(np.abs(res.completeness_residual)) <= 1e-4 * np.max(np.abs(res.fT))


# ------------------------------------------------------------------ bad input


def test_model_mismatch_names_the_parameter(run64) -> None:
    store, _, test_x, _ = run64
    with pytest.raises(ModelMismatchError, match=r"net\.0\.weight"):
        compute_kernel(store, MLP(hidden=9).double(), test_x, progress=False)


def test_wrong_input_shape(run64) -> None:
    store, fresh, _, _ = run64
    with pytest.raises(InputError, match=r"shape \(2, 5\).*trained on rows of shape \(4,\)"):
        compute_kernel(store, fresh, torch.randn(2, 5, dtype=torch.float64), progress=False)
    with pytest.raises(InputError, match="labels="):
        compute_kernel(
            store, fresh, torch.randn(2, 4, dtype=torch.float64), outputs="label", progress=False
        )
    with pytest.raises(InputError, match="outputs='bogus'"):
        compute_kernel(
            store, fresh, torch.randn(2, 4, dtype=torch.float64), outputs="bogus", progress=False
        )


def test_bad_options() -> None:
    with pytest.raises(InputError, match="unknown quadrature rule 'simpson'"):
        compute_kernel("memory://nowhere", MLP(), torch.zeros(1, 4), quadrature="simpson:3")
    with pytest.raises(InputError, match="dtype must be one of"):
        compute_kernel("memory://nowhere", MLP(), torch.zeros(1, 4), dtype="float16")


def test_trace_without_steps() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with explaind_trace.record(model, opt, store="memory://engine-empty"):
        pass
    with pytest.raises(EmptyTraceError, match="no committed optimizer step"):
        compute_kernel("memory://engine-empty", MLP(), torch.zeros(1, 4), progress=False)


def test_unregistered_optimizer_rule() -> None:
    from explaind_kernel.rules import base

    model = MLP()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    from explaind_trace import optimizers

    explaind_trace.register_optimizer(torch.optim.Adagrad)
    try:
        with explaind_trace.record(model, opt, store="memory://engine-adagrad"):
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(4, 4)).sum().backward()
                opt.step()
        with pytest.raises(UnsupportedOptimizerError, match=r"Adagrad.*register_rule"):
            compute_kernel("memory://engine-adagrad", MLP(), torch.zeros(1, 4), progress=False)
        assert torch.optim.Adagrad not in base._RULES
    finally:  # later tests see the registry as it was
        optimizers._REGISTRY.pop(torch.optim.Adagrad, None)


def test_interrupted_run_is_explained_up_to_its_last_step(caplog) -> None:
    setup = _mlp64(steps=30)
    torch.manual_seed(0)
    model = setup.make_model()
    fresh = setup.make_model()
    g = torch.Generator().manual_seed(0)
    x, y, test_x = setup.make_data(g)
    opt = setup.make_opt(model)
    with pytest.raises(RuntimeError, match="boom"):
        with explaind_trace.record(model, opt, store="memory://engine-broken", checkpoint_every=4):
            for t in range(30):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[:6]), y[:6]).backward()
                opt.step()
                if t == 9:
                    raise RuntimeError("boom")
    with caplog.at_level(logging.WARNING):
        res = compute_kernel(
            "memory://engine-broken", fresh, test_x, dtype="float64", progress=False
        )
    assert "unfinished" in caplog.text
    assert res.num_steps == 10 and res.extra["finished"] is False
    with torch.no_grad():
        actual = model(test_x).numpy()
    _close(res.fT, actual)
    assert np.max(np.abs(res.completeness_residual)) <= 1e-10 * np.max(np.abs(actual))


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
def test_training_routes_agree(setup: KernelSetup, caplog) -> None:
    """Per-sample gradients, output tangents (jvp) and auto (layer rules where they hold per
    sample) give the same kernel values, also with train-mode batch norm and dropout."""
    short = KernelSetup(setup.name, setup.make_model, setup.make_data, setup.make_opt, steps=6)
    fresh, test_x, _ = train(short, f"memory://routes-{setup.name}")
    kw = dict(dtype="float64", progress=False)
    a = compute_kernel(
        f"memory://routes-{setup.name}", fresh, test_x[:1], training_mode="per_sample", **kw
    )
    b = compute_kernel(
        f"memory://routes-{setup.name}", fresh, test_x[:1], training_mode="jvp", **kw
    )
    _close(b.data, a.data, np.max(np.abs(a.data)))
    _close(b.component_data, a.component_data, np.max(np.abs(a.component_data)))
    _close(b.nondata, a.nondata, np.max(np.abs(a.data)))
    with caplog.at_level(logging.INFO, logger="explaind_kernel.training_side"):
        c = compute_kernel(
            f"memory://routes-{setup.name}", fresh, test_x[:1], training_mode="auto", **kw
        )
    _close(c.data, a.data, np.max(np.abs(a.data)))
    _close(c.component_data, a.component_data, np.max(np.abs(a.component_data)))
    # the per-sample check catches the rows that train-mode batch norm couples
    assert ("do not hold per sample" in caplog.text) == (setup.name == "cnn_bn_sgd")


class _KwModel(nn.Module):
    """A model called with keyword inputs only, like a Hugging Face model under Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
        return self.head(h)


def test_keyword_inputs() -> None:
    torch.manual_seed(0)
    model = _KwModel().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 10, (16, 5))
    mask = torch.ones_like(ids)
    y = torch.randint(0, 3, (16,))
    with explaind_trace.record(model, opt, store="memory://engine-kw"):
        for t in range(6):
            opt.zero_grad()
            out = model(input_ids=ids[t : t + 4], attention_mask=mask[t : t + 4])
            nn.functional.cross_entropy(out, y[t : t + 4]).backward()
            opt.step()
    fresh = _KwModel().double()
    test = {"input_ids": ids[:3], "attention_mask": mask[:3]}
    res = compute_kernel("memory://engine-kw", fresh, test, dtype="float64", progress=False)
    with torch.no_grad():
        actual = model(**test).numpy()
    _close(res.fT, actual)
    assert np.max(np.abs(res.completeness_residual)) <= EXACT * np.max(np.abs(actual))
    assert np.max(np.abs(res.nondata)) <= EXACT * np.max(np.abs(res.data))
    with pytest.raises(InputError, match="keyword inputs as a dict"):
        compute_kernel("memory://engine-kw", fresh, ids[:3], progress=False)


def test_adaptive_bisection_handles_relu_kinks() -> None:
    """ReLU makes J̄'s integrand piecewise constant along a step: a higher-order rule alone does
    not converge, bisecting the sub-segments with the largest measured error does."""
    setup = KernelSetup(
        "relu", SETUPS[2].make_model, SETUPS[2].make_data, SETUPS[2].make_opt, steps=5
    )
    fresh, test_x, _ = train(setup, "memory://engine-relu")
    kw = dict(dtype="float64", progress=False)
    plain = compute_kernel("memory://engine-relu", fresh, test_x[:1], quadrature="gauss:2", **kw)
    worst = float(np.max(np.abs(plain.step_quadrature_error)))
    tol = worst / 100
    ada = compute_kernel(
        "memory://engine-relu",
        fresh,
        test_x[:1],
        quadrature="gauss:2",
        adaptive_tol=tol,
        max_nodes=512,
        **kw,
    )
    assert np.max(np.abs(ada.step_quadrature_error)) <= tol
    assert ada.step_nodes.max() > 2 and np.all(ada.step_nodes <= 512)
