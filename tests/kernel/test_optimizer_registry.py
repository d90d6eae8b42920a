"""One registration of optimizer support covers recording, replay and the kernel's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import explaind_trace
from explaind_kernel import UnsupportedOptimizerError, compute_kernel, register_rule
from explaind_kernel.rules import adam, base
from explaind_kernel.rules.sgd import SGDRule
from explaind_trace import optimizers

from .models import MLP, KernelSetup, _mlp_data, train

FP32_REL = 1e-4  # as in test_completeness: fp32 rounding over the sweep, of the output scale


class PlainSGD(torch.optim.Optimizer):
    """θ ← θ − lr·g, written from scratch (not a subclass of a registered optimizer)."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


@pytest.fixture
def registry():
    """Undo what a test registers."""
    before, rules = dict(optimizers._REGISTRY), dict(base._RULES)
    yield
    optimizers._REGISTRY.clear()
    optimizers._REGISTRY.update(before)
    base._RULES.clear()
    base._RULES.update(rules)


def test_one_registration_records_replays_and_explains(registry) -> None:
    @register_rule(PlainSGD)
    class PlainRule(SGDRule):
        """PlainSGD updates like SGD without momentum."""

    assert optimizers.support_for(PlainSGD).rule is base.rule_for(PlainSGD)
    setup = KernelSetup("plain", MLP, _mlp_data, lambda m: PlainSGD(m.parameters(), lr=0.1), 60)
    fresh, test_x, trained = train(setup, "memory://registry-plain")
    with explaind_trace.open_trace("memory://registry-plain") as trace:
        assert trace.meta.optimizer.rule.endswith("PlainSGD")
        assert trace.check_drift().exact  # replayed as itself, bit for bit
    res = compute_kernel("memory://registry-plain", fresh, test_x, progress=False)
    trained.eval()
    with torch.no_grad():
        actual = trained(test_x).double().numpy()
    scale = np.max(np.abs(actual))
    np.testing.assert_allclose(res.fT, actual, rtol=0, atol=1e-6 * scale)
    assert np.max(np.abs(res.completeness_residual)) <= FP32_REL * scale
    assert np.max(np.abs(res.residual)) <= 1e-3 * np.max(np.abs(res.fT - res.f0))


def test_unsupported_optimizer_one_error_listing_what_is_registered(registry) -> None:
    model = MLP()
    opt = torch.optim.RMSprop(model.parameters())
    listing = r"Registered: (.*; )?torch\.optim\.adam\.Adam \(record, replay, kernel\);.*SGD"
    with pytest.raises(
        UnsupportedOptimizerError,
        match=r"RMSprop is not supported: no support is registered for it\. ",
    ):
        with explaind_trace.record(model, opt, store="memory://registry-rms"):
            pass
    with pytest.raises(UnsupportedOptimizerError, match=listing + r".*register_rule"):
        base.rule_for(torch.optim.RMSprop)
    # registered for recording and replay only: the kernel says what is missing, same message
    explaind_trace.register_optimizer(torch.optim.RMSprop)
    with pytest.raises(
        UnsupportedOptimizerError,
        match=r"RMSprop is not supported: no kernel rule .*RMSprop \(record, replay\)",
    ):
        base.rule_for(torch.optim.RMSprop)
    # an optimizer the kernel registers later keeps its trace registration and gains the rule
    register_rule(torch.optim.RMSprop)(SGDRule)
    assert optimizers.support_for(torch.optim.RMSprop).what == "record, replay, kernel"


def test_register_rule_refuses_what_is_not_an_optimizer_or_a_rule(registry) -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        register_rule(dict)(SGDRule)
    with pytest.raises(TypeError, match="OptimizerRule subclass"):
        register_rule(PlainSGD)(dict)
    assert PlainSGD not in optimizers._REGISTRY


def test_a_subclass_uses_the_rule_of_the_class_it_is_replayed_as(registry) -> None:
    class MyAdam(torch.optim.Adam):
        pass

    assert base.rule_for(MyAdam) is base.rule_for(torch.optim.Adam)
    explaind_trace.register_optimizer(MyAdam)  # replayed as itself now, with no rule of its own
    with pytest.raises(UnsupportedOptimizerError, match=r"MyAdam is not supported: no kernel rule"):
        base.rule_for(MyAdam)


def test_adamw_is_registered_by_itself_and_always_decoupled() -> None:
    """AdamW's own entry, whatever torch's class tree: torch < 2.6 has no
    ``decoupled_weight_decay`` key in AdamW's groups and AdamW does not subclass Adam."""
    assert optimizers.resolve_optimizer(torch.optim.AdamW) is torch.optim.AdamW
    rule = base.rule_for(torch.optim.AdamW)
    assert isinstance(rule, adam.AdamWRule)
    g = torch.Generator().manual_seed(0)
    shape = (3, 4)
    theta, m = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    v = torch.rand(shape, generator=g)
    jbar = torch.randn(2, *shape, generator=g)
    state = {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": v}
    hp = {"lr": 0.01, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.1}

    def step(hyper):
        return base.ParamStep("w", jbar, theta, torch.zeros(shape), m, hyper, {}, state)

    old_torch = rule.backward(step(hp), None)  # no decoupled_weight_decay key at all
    flagged = base.rule_for(torch.optim.Adam).backward(
        step({**hp, "decoupled_weight_decay": True}), None
    )
    coupled = base.rule_for(torch.optim.Adam).backward(step(hp), None)
    for a, b in zip(
        (old_torch.z_grad, old_torch.weight_decay, old_torch.recon),
        (flagged.z_grad, flagged.weight_decay, flagged.recon),
    ):
        assert torch.equal(a, b)
    assert not torch.equal(old_torch.recon, coupled.recon)  # the flag matters


def test_rule_for_trace_uses_the_class_replay_uses() -> None:
    assert isinstance(base.rule_for_trace("torch.optim.adamw.AdamW"), adam.AdamWRule)
    # an unregistered subclass is replayed (and explained) as the registered class it resolved to
    assert base.rule_for_trace("my.pkg.MyAdam", "torch.optim.adam.Adam") is base.rule_for(
        torch.optim.Adam
    )
    with pytest.raises(UnsupportedOptimizerError, match=r"'my\.pkg\.Lion' is not supported"):
        base.rule_for_trace("my.pkg.Lion", "my.pkg.Lion")


def test_without_the_kernel_the_listing_says_where_rules_come_from() -> None:
    import subprocess
    import sys

    code = (
        "import torch, explaind_trace, explaind_trace.optimizers as o\n"
        "try:\n    o.support_for(torch.optim.RMSprop)\n"
        "except explaind_trace.UnsupportedOptimizerError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "SGD (record, replay) (kernel rules are added when explaind_kernel is imported)" in (
        out.stdout
    )


def test_recording_an_optimizer_without_a_kernel_rule_warns(registry, caplog) -> None:
    explaind_trace.register_optimizer(torch.optim.RMSprop)
    model = MLP()
    opt = torch.optim.RMSprop(model.parameters())
    with caplog.at_level("WARNING", logger="explaind_trace.layout"):
        with explaind_trace.record(model, opt, store="memory://registry-rms-warn"):
            pass
    assert "RMSprop is registered for recording and replay but has no kernel rule" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="explaind_trace.layout"):
        model = MLP()
        opt = torch.optim.AdamW(model.parameters())
        with explaind_trace.record(model, opt, store="memory://registry-adamw-quiet"):
            pass
    assert "kernel rule" not in caplog.text
