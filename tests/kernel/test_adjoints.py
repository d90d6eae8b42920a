"""The optimizer rules over the flat parameter layout (explaind_kernel/adjoints.py).

Reference: the adjoint recursion of Adam/AdamW/amsgrad and SGD written out here tensor by
tensor from PyTorch's update rules (docs/design.md §2), sharing no code with the rules'
coefficients. Several steps are swept backward in float64 over tensors of different shapes in
two parameter groups with different hyperparameters, a tensor the optimizer skipped, a
momentum buffer that first appears, nesterov, dampening, maximize and both kinds of decay;
every output of every step must agree to 1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explaind_kernel.adjoints import FlatAdjoints, FlatLayout, TensorAdjoints, make_adjoints
from explaind_kernel.rules import adam, base, sgd
from explaind_kernel.rules.base import OptimizerRule, ParamStep, RuleOutput, register_rule

REL = 1e-12
SHAPES = {"w": (3, 4), "b": (5,), "k": (2, 1, 3)}
ROWS, STEPS = 3, 4


def _ref_adam(p: ParamStep, carry, decoupled: bool) -> RuleOutput:
    rows = p.jbar.shape[0]
    flat = p.jbar.reshape(rows, -1)
    if p.grad is None:
        return RuleOutput(None, flat.new_zeros(rows), torch.zeros_like(p.theta), carry)
    hp = p.hp
    b1, b2 = hp["betas"]
    lr, eps, wd = hp["lr"], hp["eps"], hp["weight_decay"]
    sign = -1.0 if hp.get("maximize") else 1.0
    k = float(p.state_after["step"])
    v = p.state_after["max_exp_avg_sq" if hp.get("amsgrad") else "exp_avg_sq"]
    d = 1.0 / (v.sqrt() / math.sqrt(1 - b2**k) + eps)
    step = lr / (1 - b1**k)
    lam = -step * d * p.jbar + (carry if carry is not None else 0.0)
    z = sign * (1 - b1) * lam
    recon = -step * d * p.state_after["exp_avg"]
    decay = flat.new_zeros(rows)
    if wd and (decoupled or hp.get("decoupled_weight_decay")):
        recon = recon - lr * wd * p.theta
        decay = flat @ (-lr * wd * p.theta).reshape(-1)
    elif wd:
        decay = z.reshape(rows, -1) @ (sign * wd * p.theta).reshape(-1)
    return RuleOutput(z, decay, recon, b1 * lam)


def _ref_sgd(p: ParamStep, carry) -> RuleOutput:
    rows = p.jbar.shape[0]
    if p.grad is None:
        return RuleOutput(None, p.jbar.new_zeros(rows), torch.zeros_like(p.theta), carry)
    hp = p.hp
    lr, wd, mu = hp["lr"], hp["weight_decay"], hp["momentum"]
    damp, nest = hp["dampening"], hp["nesterov"]
    sign = -1.0 if hp.get("maximize") else 1.0
    source = sign * p.grad + wd * p.theta
    if mu == 0:
        z_pre, recon, out = -lr * p.jbar, -lr * source, None
    else:
        first = "momentum_buffer" not in p.state_before
        buf = p.state_after["momentum_buffer"]
        lam = -lr * (mu if nest else 1.0) * p.jbar + (carry if carry is not None else 0.0)
        z_pre = lam * (1.0 if first else 1.0 - damp) - (lr * p.jbar if nest else 0.0)
        recon = -lr * (source + mu * buf) if nest else -lr * buf
        out = None if first else mu * lam
    decay = z_pre.reshape(rows, -1) @ (wd * p.theta).reshape(-1)
    return RuleOutput(sign * z_pre, decay, recon, out)


def _steps(kind: str, g: torch.Generator):
    """STEPS steps of random states (latest first) for two groups: w in group 0, b and k in 1."""
    if kind == "adam":
        groups = [
            dict(lr=0.01, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1, amsgrad=False),
            dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, amsgrad=True),
        ]
    elif kind == "adam_coupled":
        groups = [
            dict(lr=0.01, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05, maximize=True),
            dict(lr=0.02, betas=(0.7, 0.9), eps=1e-8, weight_decay=0.2),
        ]
    else:
        groups = [
            dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01),
            dict(lr=0.05, momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.0),
        ]
        if kind == "sgd_nesterov":  # one nesterov coefficient for every tensor
            groups[1] = dict(groups[0], momentum=0.5)
    switch = dict(lr=0.2, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1)
    group_of = {"w": 0, "b": 1, "k": 1}

    def hp(n: str, t: int) -> dict:
        # sgd_switch: group 1 drops its momentum for the first two steps (the adjoint that
        # reaches them from later steps is not carried into a step without momentum)
        if kind == "sgd_switch" and group_of[n] == 1 and t < 2:
            return switch
        return groups[group_of[n]]

    out = []
    for i in range(STEPS):
        t = STEPS - 1 - i
        steps = []
        for n, shape in SHAPES.items():

            def r(*s, pos=False):
                x = torch.randn(*s, generator=g, dtype=torch.float64)
                return x.abs() + 0.1 if pos else x

            grad = None if (n == "b" and t == 2) else r(*shape)
            after = {"step": torch.tensor(float(t + 1)), "exp_avg": r(*shape)}
            after["exp_avg_sq"] = r(*shape, pos=True)
            after["max_exp_avg_sq"] = after["exp_avg_sq"] + 0.5
            after["momentum_buffer"] = r(*shape)
            before = {} if (n == "k" and t == 0) else {"momentum_buffer": r(*shape)}
            before["exp_avg"] = r(*shape)
            steps.append(ParamStep(n, None, r(*shape), r(*shape), grad, hp(n, t), before, after))
        out.append((t, steps, {n: r(ROWS, *s) for n, s in SHAPES.items()}))
    return out


def _reference(kind, sweep, decoupled: bool, beta_shift: float = 0.0):
    carry = dict.fromkeys(SHAPES)
    per_step = []
    for t, steps, jbar in sweep:
        wd, tg, res, init = (np.zeros(ROWS) for _ in range(4))
        comps = np.stack(
            [
                (jbar[n].reshape(ROWS, -1) @ q.delta.reshape(-1)).numpy()
                for n, q in zip(SHAPES, steps)
            ],
            1,
        )
        zs = {}
        for q in steps:
            p = _with_jbar(q, jbar[q.name])
            if beta_shift and "betas" in p.hp:
                p.hp = {**p.hp, "betas": (p.hp["betas"][0] + beta_shift, p.hp["betas"][1])}
            out = (
                _ref_adam(p, carry[p.name], decoupled)
                if kind.startswith("adam")
                else _ref_sgd(p, carry[p.name])
            )
            carry[p.name] = out.carry
            flat = p.jbar.reshape(ROWS, -1)
            wd += out.weight_decay.numpy()
            res += (flat @ (p.delta - out.recon).reshape(-1)).numpy()
            if out.z_grad is not None:
                zs[p.name] = out.z_grad
                tg += (out.z_grad.reshape(ROWS, -1) @ p.grad.reshape(-1)).numpy()
            key = "exp_avg" if kind.startswith("adam") else "momentum_buffer"
            if t == 0 and out.carry is not None and key in p.state_before:
                init += (out.carry.reshape(ROWS, -1) @ p.state_before[key].reshape(-1)).numpy()
        per_step.append((wd, tg, res, init, comps, zs))
    return per_step, carry


def _with_jbar(p: ParamStep, jbar: torch.Tensor) -> ParamStep:
    return ParamStep(p.name, jbar, p.theta, p.delta, p.grad, p.hp, p.state_before, p.state_after)


def _flat(rule, sweep):
    layout = FlatLayout(list(SHAPES), SHAPES)
    adj = make_adjoints(rule, layout, ROWS, dtype=torch.float64, device=torch.device("cpu"))
    assert isinstance(
        adj, TensorAdjoints if type(rule).linear is OptimizerRule.linear else FlatAdjoints
    )
    per_step = []
    for t, steps, jbar in sweep:
        got = adj.step(rule, steps, jbar, initial=t == 0, components=True)
        zs = {n: v * got.z_scale for n, v in got.z_grad.items()}
        per_step.append(
            (got.weight_decay, got.total_g, got.residual, got.initial_state, got.components, zs)
        )
    return per_step, adj.carried()


def _close(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(
        np.max(np.abs(a - b), initial=0.0) <= REL * max(np.max(np.abs(b), initial=0), 1e-300)
    )


def _agree(got, ref) -> bool:
    (g_steps, g_carry), (r_steps, r_carry) = got, ref
    for g, r in zip(g_steps, r_steps):
        if not all(_close(x, y) for x, y in zip(g[:5], r[:5])):
            return False
        for n in set(g[5]) | set(r[5]):  # an adjoint left out is one that is zero
            a, b = g[5].get(n), r[5].get(n)
            if not _close(a if a is not None else 0 * b, b if b is not None else 0 * a):
                return False
    for n in SHAPES:
        if (g_carry[n] is None) != (r_carry[n] is None):
            return False
        if r_carry[n] is not None and not _close(g_carry[n], r_carry[n]):
            return False
    return True


CASES = [
    ("adam", adam.AdamWRule(), True),
    ("adam_coupled", adam.AdamRule(), False),
    ("sgd", sgd.SGDRule(), False),
    ("sgd_nesterov", sgd.SGDRule(), False),
    ("sgd_switch", sgd.SGDRule(), False),
]


@pytest.mark.parametrize("kind,rule,decoupled", CASES, ids=[c[0] for c in CASES])
def test_flat_rule_steps_equal_the_per_tensor_recursion(kind, rule, decoupled) -> None:
    sweep = _steps(kind, torch.Generator().manual_seed(3))
    ref = _reference(kind, sweep, decoupled)
    assert _agree(_flat(rule, sweep), ref)

    # a rule that only overrides backward runs tensor by tensor on the views: the same
    class Wrapped(OptimizerRule):
        state_key = rule.state_key

        def backward(self, p, carry):
            if kind.startswith("adam"):
                return _ref_adam(p, carry, decoupled)
            return _ref_sgd(p, carry)

    assert _agree(_flat(Wrapped(), sweep), ref)
    if kind.startswith("adam"):  # the comparison sees a wrong β1 in the sixth digit
        assert not _agree(_flat(rule, sweep), _reference(kind, sweep, decoupled, 1e-6))


def test_per_tensor_backward_applies_the_same_coefficients() -> None:
    """`OptimizerRule.backward` (the coefficients of `linear` on one tensor) equals the
    reference recursion, step after step."""
    sweep = _steps("sgd", torch.Generator().manual_seed(5))
    carry = dict.fromkeys(SHAPES)
    ref_carry = dict.fromkeys(SHAPES)
    for _t, steps, jbar in sweep:
        for p in steps:
            q = _with_jbar(p, jbar[p.name])
            got = sgd.SGDRule().backward(q, carry[p.name])
            ref = _ref_sgd(q, ref_carry[p.name])
            for a, b in zip(
                (got.z_grad, got.weight_decay, got.recon), (ref.z_grad, ref.weight_decay, ref.recon)
            ):
                assert (a is None) == (b is None)
                if a is not None:
                    assert _close(a, b)
            carry[p.name], ref_carry[p.name] = got.carry, ref.carry


def test_a_rule_must_define_linear_or_backward() -> None:
    class Empty(OptimizerRule):
        pass

    class Opt(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match="Empty defines neither linear\\(\\) nor backward\\(\\)"):
        register_rule(Opt)(Empty)
    with pytest.raises(NotImplementedError, match="defines neither linear"):
        Empty().backward(ParamStep("w", torch.zeros(1, 2), *[torch.zeros(2)] * 3, {}, {}, {}), None)
    assert Opt not in base._RULES


def test_layout_views_share_the_buffer() -> None:
    layout = FlatLayout(list(SHAPES), SHAPES)
    flat = torch.zeros(ROWS, layout.size, dtype=torch.float64)
    views = layout.views(flat)
    views["k"].fill_(2.0)
    assert layout.size == 12 + 5 + 6
    assert flat[:, 17:].eq(2.0).all() and flat[:, :17].eq(0.0).all()
    parts = {n: torch.randn(ROWS, *s, dtype=torch.float64) for n, s in SHAPES.items()}
    back = layout.views(torch.cat([parts[n].reshape(ROWS, -1) for n in SHAPES], 1))
    assert all(torch.equal(back[n], parts[n]) for n in SHAPES)


def _wrapped(kind: str, decoupled: bool) -> OptimizerRule:
    class Wrapped(OptimizerRule):
        state_key = "exp_avg" if kind.startswith("adam") else "momentum_buffer"

        def backward(self, p, carry):
            if kind.startswith("adam"):
                return _ref_adam(p, carry, decoupled)
            return _ref_sgd(p, carry)

    return Wrapped()


@pytest.mark.parametrize("kind,rule,decoupled", CASES, ids=[c[0] for c in CASES])
def test_carry_scale_folded_back_every_step_changes_nothing(
    kind, rule, decoupled, monkeypatch
) -> None:
    """The carry's scale σ leaves a narrow range at once: folded back into the buffer each step."""
    import explaind_kernel.adjoints as adjoints

    monkeypatch.setattr(adjoints, "_SIGMA_RANGE", (0.99, 1.01))
    sweep = _steps(kind, torch.Generator().manual_seed(11))
    assert _agree(_flat(rule, sweep), _reference(kind, sweep, decoupled))


@pytest.mark.parametrize("kind,rule,decoupled", CASES, ids=[c[0] for c in CASES])
def test_boundary_adjoint_passes_without_jbar(kind, rule, decoupled) -> None:
    """The sharded passes (J̄ = 0, an incoming carry on two of the three tensors): the terms of
    every step and the carry out equal the per-tensor recursion's."""
    g = torch.Generator().manual_seed(13)
    sweep = _steps(kind, g)
    carry_in = {
        "w": torch.randn(ROWS, *SHAPES["w"], generator=g, dtype=torch.float64),
        "k": torch.randn(ROWS, *SHAPES["k"], generator=g, dtype=torch.float64),
    }
    layout = FlatLayout(list(SHAPES), SHAPES)
    outs = []
    for r in (rule, _wrapped(kind, decoupled)):
        adj = make_adjoints(
            r, layout, ROWS, dtype=torch.float64, device=torch.device("cpu"), carry_in=carry_in
        )
        per_step = []
        for t, steps, _ in sweep:
            got = adj.step(r, steps, None, initial=t == 0)
            assert got.components is None
            zs = {n: v * got.z_scale for n, v in got.z_grad.items()}
            zero = np.zeros((ROWS, len(SHAPES)))
            per_step.append(
                (got.weight_decay, got.total_g, got.residual, got.initial_state, zero, zs)
            )
        scan = make_adjoints(
            r, layout, ROWS, dtype=torch.float64, device=torch.device("cpu"), carry_in=carry_in
        )
        for _, steps, _ in sweep:
            assert scan.step(r, steps, None, terms=False) is None
        outs.append(((per_step, adj.carried()), scan.carried()))
    (flat, flat_scan), (ref, ref_scan) = outs
    assert _agree(flat, ref)
    assert any(np.any(s[1] != 0) for s in ref[0])  # the boundary adjoint reached a gradient
    for n in SHAPES:
        assert (flat_scan[n] is None) == (ref_scan[n] is None)
        if ref_scan[n] is not None:
            assert _close(flat_scan[n], ref_scan[n])


def _two_groups(kind: str):
    def make(m):
        first, second = list(m.net[0].parameters()), list(m.net[2].parameters())
        if kind == "adam_groups":  # c·σ differs between the groups: Z is written out
            return torch.optim.AdamW(
                [{"params": first}, {"params": second, "betas": (0.8, 0.95), "lr": 3e-3}],
                lr=1e-2,
                weight_decay=0.1,
            )
        if kind == "adam":  # one c·σ for every tensor: the training side contracts C's views
            return torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.05)
        return torch.optim.SGD(  # nesterov in one group
            [{"params": first, "nesterov": True}, {"params": second, "dampening": 0.0}],
            lr=0.05,
            momentum=0.9,
            weight_decay=1e-3,
        )

    return make


@pytest.mark.parametrize("kind", ["adam", "adam_groups", "sgd_nesterov"])
def test_kernel_flat_equals_tensor_by_tensor(kind, monkeypatch) -> None:
    """The whole kernel (slices, every joint slice kept, windows, scores) with the flat
    adjoints equals the same run with the rule applied tensor by tensor, to 1e-12."""
    from explaind_kernel import KeepOptions, compute_kernel
    from explaind_kernel import sweep as sweep_mod

    from .models import MLP, KernelSetup, train

    setup = KernelSetup(
        kind,
        lambda: MLP().double(),
        lambda g: (
            lambda x: (x, (x[:, 0] > 0).long(), torch.randn(3, 4, generator=g, dtype=torch.float64))
        )(torch.randn(24, 4, generator=g, dtype=torch.float64)),
        _two_groups(kind),
        steps=9,
        batch=6,
    )
    store = f"memory://adjoints-{kind}"
    fresh, test_x, _ = train(setup, store, checkpoint_every=4)
    kw = dict(
        dtype="float64",
        progress=False,
        training_mode="rules",
        cpu_threads=1,
        slices={"half": ("net.0.weight", slice(0, 4))},
        keep=KeepOptions(
            sample_component=True, sample_window=True, component_window=True, param_scores=True
        ),
        step_windows=3,
    )
    flat = compute_kernel(store, fresh, test_x, **kw)

    def tensor_by_tensor(rule, layout, rows, **k):
        return TensorAdjoints(layout, rows, **k)

    monkeypatch.setattr(sweep_mod, "make_adjoints", tensor_by_tensor)
    ref = compute_kernel(store, fresh, test_x, **kw)
    for name in (
        "data",
        "step_data",
        "step_weight_decay",
        "step_nondata",
        "step_initial_state",
        "step_residual",
        "components",
        "component_data",
        "component_window",
        "sample_component",
        "sample_window",
    ):
        a, b = getattr(flat, name), getattr(ref, name)
        # rounding-level terms (non-data, residual) on the scale of the data terms
        scale = max(np.max(np.abs(b)), np.max(np.abs(ref.data)))
        assert np.max(np.abs(a - b)) <= REL * scale, name
    assert np.any(flat.weight_decay != 0) and np.any(flat.sample_component != 0)
    for n in ref.param_scores:
        assert _close(flat.param_scores[n], ref.param_scores[n]), n
