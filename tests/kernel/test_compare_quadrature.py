"""compare_quadrature: each rule's error over a trace by forward-mode JVPs, without the kernel.

References: the closed-form piecewise Jacobians of test_kinks (autograd, float64) for J̄·Δθ at
one step, and the full kernel (reverse-mode Jacobians, the engine's own bookkeeping) for the
error summed over a whole trace, rule by rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind_kernel import InputError, compare_quadrature, compute_kernel
from explaind_kernel.compare import RuleSpec
from explaind_kernel.quadrature import Quadrature

from .models import SETUPS, KernelSetup, train
from .test_kinks import ACTIVATIONS, _reference, _setup


def _lin(jac: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(jac[k].reshape(jac[k].shape[0], -1) @ delta[k].reshape(-1) for k in delta)


@pytest.mark.parametrize("name", ["nn.ReLU", "hardtanh", "abs"])
@pytest.mark.parametrize("rule", ["gauss:1", "gauss:2", "midpoint:7"])
def test_jvp_matches_the_jacobian_at_the_same_nodes(name, rule) -> None:
    act, thresholds = ACTIVATIONS[name]
    model, side, x, theta, delta = _setup(act)
    nodes, weights = Quadrature.parse(rule).points()
    lin, evals = side.integrated_jvp(theta, delta, {}, nodes, weights)
    jbar, evals_j = side.integrated_jacobian(theta, delta, {}, nodes, weights)
    ref = _lin(jbar, delta)
    assert evals == evals_j == len(nodes)
    assert float((lin - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    # with kink splits: the same cuts, and the closed-form piecewise reference
    lin_k, evals_k = side.integrated_jvp(theta, delta, {}, nodes, weights, kink_splits=200)
    jbar_k, evals_kj = side.integrated_jacobian(theta, delta, {}, nodes, weights, kink_splits=200)
    closed = _lin(_reference(model, x, theta, delta, thresholds), delta)
    assert evals_k == evals_kj > len(nodes)
    assert float((lin_k - _lin(jbar_k, delta)).abs().max()) <= 1e-12 * float(closed.abs().max())
    assert side.mode == "func"  # forward mode ran; no silent fallback
    if rule.startswith("gauss"):  # exact on every piece
        assert float((lin_k - closed).abs().max()) <= 1e-12 * float(closed.abs().max())


RELU_TRANSFORMER = KernelSetup(
    "relu", SETUPS[2].make_model, SETUPS[2].make_data, SETUPS[2].make_opt, steps=6
)
CNN_BN = KernelSetup("cnn", SETUPS[1].make_model, SETUPS[1].make_data, SETUPS[1].make_opt, steps=6)


@pytest.mark.parametrize("setup", [RELU_TRANSFORMER, CNN_BN], ids=lambda s: s.name)
def test_errors_equal_the_kernels_quadrature_term(setup) -> None:
    """Per test input and output, the summed error is the kernel's quadrature_error for the same
    rule (the CNN's batch-norm buffers move every step; the error is taken at b_t like the
    kernel's), and the evaluations per step are the kernel's."""
    store = f"memory://compare-{setup.name}"
    fresh, test_x, _ = train(setup, store)
    rules = ["gauss:1", "gauss:2+kinks", "midpoint:5"]
    kw = dict(dtype="float64", progress=False)
    got = compare_quadrature(store, fresh, test_x, rules, **kw)
    assert [g.rule for g in got] == ["gauss:1", "gauss:2+kinks:64", "midpoint:5"]
    for g, r in zip(got, rules):
        spec = RuleSpec.parse(r)
        res = compute_kernel(
            store,
            fresh,
            test_x,
            quadrature=str(spec.quadrature),
            kink_splits=spec.kink_splits,
            **kw,
        )
        np.testing.assert_array_equal(g.fT, res.fT)
        # the error is a difference of O(|f|) values: agreement to rounding of |f|, far below
        # the error itself (asserted to be ≥ 1e4× larger)
        fscale = float(np.max(np.abs(res.fT)))
        assert float(np.max(np.abs(res.quadrature_error))) > 1e4 * 1e-12 * fscale
        np.testing.assert_allclose(g.error, res.quadrature_error, rtol=0, atol=1e-12 * fscale)
        np.testing.assert_allclose(
            g.step_max_abs,
            np.abs(res.step_quadrature_error).reshape(-1, res.num_steps).max(0),
            rtol=0,
            atol=1e-12 * fscale,
        )
        assert g.evaluations_per_step == pytest.approx(float(np.mean(res.step_nodes)))
        assert g.rel_error == pytest.approx(g.max_abs / float(np.max(np.abs(res.fT))))
    if setup is RELU_TRANSFORMER:  # kinks matter here: splitting beats the plain rules
        assert got[1].max_abs < got[0].max_abs / 10
        assert got[1].probe_passes_per_step == 9 and got[0].probe_passes_per_step == 0


def test_label_outputs() -> None:
    store = "memory://compare-label"
    fresh, test_x, model = train(RELU_TRANSFORMER, store)
    labels = model.eval()(test_x).argmin(1)
    (got,) = compare_quadrature(
        store, fresh, test_x, ["gauss:2"], outputs="label", labels=labels, progress=False
    )
    (full,) = compare_quadrature(store, fresh, test_x, ["gauss:2"], progress=False)
    assert got.error.shape == (len(test_x), 1)
    np.testing.assert_allclose(
        got.error[:, 0], full.error[np.arange(len(test_x)), labels.numpy()], rtol=1e-5, atol=1e-9
    )


def test_bad_rules() -> None:
    for bad, match in [
        ("gauss:2+knots", "RULE:NODES"),
        ("gauss:2+kinks:x", "kink limit"),
        ("gauss:2+kinks:0", "≥ 1"),
        ("simpson:3", "unknown quadrature rule"),
    ]:
        with pytest.raises(InputError, match=match):
            RuleSpec.parse(bad)
    store = "memory://compare-bad"
    fresh, test_x, _ = train(RELU_TRANSFORMER, store)
    with pytest.raises(InputError, match="at least one rule"):
        compare_quadrature(store, fresh, test_x, [], progress=False)
    with pytest.raises(InputError, match="shape"):
        compare_quadrature(store, fresh, test_x[:, :2], ["gauss:1"], progress=False)


def test_cli_prints_the_same_numbers(tmp_path, monkeypatch, capsys) -> None:
    import json
    import sys

    import explaind_attr.app.cli as cli

    store = str(tmp_path / "run.lmdb")
    fresh, test_x, _ = train(RELU_TRANSFORMER, store)
    np.save(tmp_path / "x.npy", test_x.numpy())
    (tmp_path / "usermod_quadrature.py").write_text(
        "from tests.kernel.models import TinyTransformer\n\n"
        "def make_model():\n    return TinyTransformer()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "usermod_quadrature", raising=False)
    args = ["quadrature", store, "--model", "usermod_quadrature:make_model", "--inputs", "x.npy"]
    rules = "gauss:1,gauss:1+kinks:4"
    assert cli.main([*args, "--rules", rules, "--no-progress", "--json", "q.json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rule", "evaluations/step", "max_abs", "rel"]
    want = compare_quadrature(store, fresh, test_x, rules.split(","), progress=False)
    saved = json.loads((tmp_path / "q.json").read_text())
    for line, w, s in zip(lines[1:], want, saved):
        rule, evals, max_abs, rel = line.split()
        assert rule == w.rule == s["rule"]
        assert float(evals) == pytest.approx(w.evaluations_per_step, abs=0.01)
        assert float(max_abs) == pytest.approx(w.max_abs, rel=1e-3)
        assert float(rel) == pytest.approx(w.rel_error, rel=1e-3)
        assert s["max_abs_error"] == pytest.approx(w.max_abs, rel=1e-6)
    assert len(lines) == 3
    assert cli.main([*args, "--rules", "gauss:2+knots"]) == 2
    assert "RULE:NODES" in capsys.readouterr().err
