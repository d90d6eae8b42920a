"""Kink-aware quadrature: each step cut where ReLU-type ops switch, the rule on every piece.

Reference: on a one-hidden-layer network the pre-activations are affine in s along a step, so
the kinks are known in closed form; the reference integrates ∂f/∂θ (torch.autograd.functional)
piece by piece between them with a 3-node Gauss rule, in float64. The integrand is polynomial of
degree ≤ 2 on each piece, so the reference and the engine must agree to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explaind_kernel import InputError, KernelConfig, compute_kernel, jacobian
from explaind_kernel.functional import FunctionalModel, OutputSelector
from explaind_kernel.quadrature import Quadrature

from .models import SETUPS, KernelSetup, train

# (activation, its thresholds): the pre-activation crosses each threshold at a kink
ACTIVATIONS = {
    "nn.ReLU": (nn.ReLU(), (0.0,)),
    "nn.ReLU(inplace)": (nn.ReLU(inplace=True), (0.0,)),
    "relu_": (torch.relu_, (0.0,)),
    "Tensor.relu": (lambda h: h.relu(), (0.0,)),
    "leaky_relu": (nn.LeakyReLU(0.1), (0.0,)),
    "relu6": (nn.ReLU6(), (0.0, 6.0)),
    "hardtanh": (nn.Hardtanh(-0.5, 0.7), (-0.5, 0.7)),
    "clamp": (lambda h: h.clamp(min=-0.3, max=0.4), (-0.3, 0.4)),
    "abs": (torch.abs, (0.0,)),
}


class OneHidden(nn.Module):
    def __init__(self, act, d_in: int = 5, hidden: int = 24, d_out: int = 3) -> None:
        super().__init__()
        self.inp, self.out, self.act = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.inp(x)))


def _setup(act, seed: int = 0, scale: float = 3.0):
    torch.manual_seed(seed)
    model = OneHidden(act).double()
    fm = FunctionalModel(model, output_module=None, device=torch.device("cpu"), dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    side = jacobian.TestSide(fm, OutputSelector("all"), (x,), torch.zeros(4, dtype=torch.long))
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    delta = {k: scale * torch.randn_like(v) for k, v in theta.items()}
    return model, side, x, theta, delta


def _reference(model, x, theta, delta, thresholds) -> dict[str, torch.Tensor]:
    """Σ over closed-form pieces of Gauss-3 ∂f/∂θ, one input at a time: {name: [n·O, *shape]}."""
    names = list(theta)
    nodes, weights = Quadrature("gauss", 3).points()

    def f(xi, *params):
        p = dict(zip(names, params))
        h = xi @ p["inp.weight"].T + p["inp.bias"]
        return model.act(h) @ p["out.weight"].T + p["out.bias"]

    rows: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for xi in x:
        h0 = xi @ theta["inp.weight"].T + theta["inp.bias"]
        dh = xi @ delta["inp.weight"].T + delta["inp.bias"]
        cuts = [((c - h0) / dh).numpy() for c in thresholds]
        cuts = np.concatenate([c[(c > 0) & (c < 1)] for c in cuts])
        edges = np.concatenate([[0.0], np.sort(cuts), [1.0]])
        total = {k: torch.zeros(3, *theta[k].shape, dtype=torch.float64) for k in names}
        for a, b in zip(edges[:-1], edges[1:]):
            for s, w in zip(a + (b - a) * nodes, (b - a) * weights):
                point = tuple(theta[k] + float(s) * delta[k] for k in names)
                jac = torch.autograd.functional.jacobian(lambda *p, xi=xi: f(xi, *p), point)
                for k, j in zip(names, jac):
                    total[k] += float(w) * j
        for k in names:
            rows[k].append(total[k])
    return {k: torch.cat(v, 0) for k, v in rows.items()}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("rule", ["gauss:1", "gauss:2"])
def test_split_at_kinks_is_exact_on_piecewise_polynomial_integrands(name, rule) -> None:
    act, thresholds = ACTIVATIONS[name]
    model, side, x, theta, delta = _setup(act)
    nodes, weights = Quadrature.parse(rule).points()
    jbar, evals = side.integrated_jacobian(theta, delta, {}, nodes, weights, kink_splits=200)
    ref = _reference(model, x, theta, delta, thresholds)
    for k in theta:
        scale = float(ref[k].abs().max())
        assert float((jbar[k] - ref[k]).abs().max()) <= 1e-12 * max(scale, 1.0), k
    # the path identity holds per step to rounding, where the unsplit rule is far off
    f0 = side.values(theta, {})
    f1 = side.values({k: theta[k] + delta[k] for k in theta}, {})
    lin = sum(jbar[k].reshape(jbar[k].shape[0], -1) @ delta[k].reshape(-1) for k in theta)
    assert float((f1 - f0 - lin).abs().max()) <= 1e-12 * float(f1.abs().max())
    plain, one = side.integrated_jacobian(theta, delta, {}, nodes, weights)
    lin_plain = sum(plain[k].reshape(plain[k].shape[0], -1) @ delta[k].reshape(-1) for k in theta)
    assert float((f1 - f0 - lin_plain).abs().max()) > 1e-6
    assert evals > one == len(nodes)  # cuts were made, and each costs the rule's nodes


def test_kinks_that_cannot_reach_the_output_are_not_split() -> None:
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 8)

        def forward(self, x):
            torch.relu(self.unused(x))  # switches along the step, but f never sees it
            return self.used(x)

    torch.manual_seed(0)
    model = Dead().double()
    fm = FunctionalModel(model, output_module=None, device=torch.device("cpu"), dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    side = jacobian.TestSide(fm, OutputSelector("all"), (x,), torch.zeros(4, dtype=torch.long))
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    delta = {k: 3 * torch.randn_like(v) for k, v in theta.items()}
    nodes, weights = Quadrature("gauss", 2).points()
    _, evals = side.integrated_jacobian(theta, delta, {}, nodes, weights, kink_splits=50)
    assert evals == 2.0


def test_limit_keeps_the_largest_jumps() -> None:
    act, _ = ACTIVATIONS["nn.ReLU"]
    _, side, _, theta, delta = _setup(act)
    nodes, weights = Quadrature("gauss", 1).points()
    _, all_evals = side.integrated_jacobian(theta, delta, {}, nodes, weights, kink_splits=200)
    _, two = side.integrated_jacobian(theta, delta, {}, nodes, weights, kink_splits=2)
    assert all_evals > 3.0 and two == 3.0  # every input has > 2 kinks; 2 cuts → 3 pieces


def test_engine_kink_splits_on_a_relu_transformer() -> None:
    """A deep ReLU path (attention feeds the MLP): kinks are located on the probe grid, so not
    exactly, yet the measured per-step error drops by orders of magnitude, and completeness
    holds either way."""
    setup = KernelSetup(
        "relu", SETUPS[2].make_model, SETUPS[2].make_data, SETUPS[2].make_opt, steps=5
    )
    fresh, test_x, _ = train(setup, "memory://kinks-relu")
    kw = dict(dtype="float64", progress=False, quadrature="gauss:2")
    plain = compute_kernel("memory://kinks-relu", fresh, test_x, **kw)
    split = compute_kernel("memory://kinks-relu", fresh, test_x, kink_splits=64, **kw)
    err_plain = np.max(np.abs(plain.step_quadrature_error))
    err_split = np.max(np.abs(split.step_quadrature_error))
    assert err_split < err_plain / 100
    assert split.step_nodes.max() > 2 and plain.step_nodes.max() == 2
    for res in (plain, split):  # fp32-trained run explained in float64: ~1e-8 (config.py)
        max_abs, _ = res.completeness()
        assert max_abs <= 1e-7 * float(np.max(np.abs(res.fT)))
    np.testing.assert_allclose(split.fT, plain.fT, rtol=0, atol=0)
    # adaptive bisection on top of the splits still meets its tolerance
    tol = err_split / 10
    both = compute_kernel(
        "memory://kinks-relu", fresh, test_x, kink_splits=64, adaptive_tol=tol, max_nodes=256, **kw
    )
    assert np.max(np.abs(both.step_quadrature_error)) <= tol


def test_bad_kink_options() -> None:
    with pytest.raises(InputError, match="kink_splits"):
        KernelConfig(kink_splits=-1)
    with pytest.raises(InputError, match="kink_probes"):
        KernelConfig(kink_probes=0)
