"""The work model in result.extra["work"]: FLOPs per phase from shapes, times per phase."""

from __future__ import annotations

import pytest

from explaind_kernel import compute_kernel
from explaind_kernel.workmodel import PHASES, PhaseClock

from .models import SETUPS, KernelSetup, train


def test_flops_follow_the_shapes() -> None:
    setup = SETUPS[0]  # MLP 4 → 8 → 3, AdamW, batch 8
    short = KernelSetup(setup.name, setup.make_model, setup.make_data, setup.make_opt, steps=4)
    fresh, test_x, _ = train(short, "memory://work-mlp")
    res = compute_kernel("memory://work-mlp", fresh, test_x, progress=False)
    work = res.extra["work"]
    n, o, t, params = 3, 3, 4, 4 * 8 + 8 + 8 * 3 + 3
    f = 2 * (4 * 8 + 8 * 3)  # one input's forward: two matmuls (FlopCounterMode: 2·m·n·k)
    evaluations = t * n * 2  # gauss:2, no kink splits
    assert work["flops"]["test_jacobian"] == pytest.approx(evaluations * o * 2 * f)
    assert work["flops"]["values"] == pytest.approx(2 * t * n * f)
    assert work["flops"]["kinks"] == 0.0
    assert work["counts"]["batch_rows"] == t * 8
    assert work["flops"]["training"] == pytest.approx(2 * t * 8 * n * o * params + 3 * t * 8 * f)
    assert work["flops"]["rule"] == pytest.approx(8 * t * n * o * params)
    assert set(work["seconds"]) == {*PHASES, "other"}
    assert sum(work["seconds"].values()) == pytest.approx(work["wall"], rel=1e-3, abs=1e-4)


def test_nested_phases_are_charged_exclusively() -> None:
    clock = PhaseClock()
    with clock.phase("test_jacobian"):
        with clock.phase("kinks"):
            pass
    outer, inner = clock.seconds["test_jacobian"], clock.seconds["kinks"]
    assert outer >= 0 and inner >= 0
    with clock.phase("rule"):
        pass
    assert clock.seconds["kinks"] == inner  # untouched by later phases
