"""Kernel results on a trace recorded with gradients="recompute" (or "auto") are bitwise those
of the same seeded run recorded with stored gradients."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

import explaind_trace as et
from explaind_kernel import compute_kernel
from explaind_kernel.persample.local import math_attention

from .models import SETUPS, train

#: the training-side route fixed: "auto" picks the fastest by timing, and the routes agree
#: to rounding, not bitwise, so two runs of "auto" on one trace may differ in the last bits
FIXED = {"progress": False, "training_mode": "rules"}


def _equal_results(a, b) -> None:
    for f in dataclasses.fields(a):
        if f.name in ("trace_id", "extra", "config"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        elif isinstance(x, dict):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), f.name
        else:
            assert x == y, f.name


@pytest.mark.parametrize("setup", SETUPS[1:], ids=lambda s: s.name)  # BN CNN; dropout Transformer
def test_kernel_on_recompute_trace_equals_stored(setup) -> None:
    setup = dataclasses.replace(setup, steps=12)
    results = []
    for mode in ("stored", "recompute"):
        store = f"memory://kernel-recompute-{setup.name}-{mode}"
        fresh, test_x, _ = train(setup, store, gradients=mode, checkpoint_every=5)
        results.append(compute_kernel(store, fresh, test_x, outputs="all", **FIXED))
    _equal_results(*results)
    assert np.abs(results[1].completeness_residual).max() > 0  # a real result, not all zeros


@pytest.mark.parametrize(
    "tamper,cause", [({"l2": 1e-2}, "L2 term"), ({"clip": 0.05}, "gradient clipping")]
)
def test_kernel_on_auto_trace_is_exact_again(tamper, cause) -> None:
    setup = dataclasses.replace(SETUPS[0], steps=12)
    results = []
    for mode in ("stored", "auto"):
        store = f"memory://kernel-auto-{cause}-{mode}"
        fresh, test_x, _ = train(setup, store, gradients=mode, checkpoint_every=5, **tamper)
        results.append(compute_kernel(store, fresh, test_x, outputs="all", **FIXED))
        if mode == "auto":
            with et.open_trace(store) as trace:
                assert trace.gradients_stored_from == 0
                assert cause in trace.progress["gradients_switch_reason"]
    _equal_results(*results)
    scale = np.abs(results[1].fT).max()
    assert np.abs(results[1].completeness_residual).max() <= 1e-4 * scale
    assert np.abs(results[1].nondata).max() > 0  # the clipped / L2 part, kept apart


def test_kernel_on_recompute_trace_with_clipping_names_the_step() -> None:
    setup = dataclasses.replace(SETUPS[0], steps=6)
    store = "memory://kernel-recompute-clip"
    fresh, test_x, _ = train(setup, store, clip=0.01, gradients="recompute", checkpoint_every=5)
    # the sweep replays the last segment first: [5, 6) is where it finds the first mismatch
    with pytest.raises(et.GradientMismatchError, match="step 5, parameter .*clipping"):
        compute_kernel(store, fresh, test_x, progress=False)


class _Attention(torch.nn.Module):
    """Linear → scaled_dot_product_attention → linear: the fused CPU kernel and the math one
    give different bits."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(h.mean(1))


def test_recompute_replay_in_a_thread_never_runs_under_the_kernels_math_attention() -> None:
    """The kernel's prefetch thread recomputes gradients while its sweep sits in
    math_attention() (process-wide SDPA flags): the replay waits for the section to end."""
    torch.manual_seed(0)
    model = _Attention()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 5, 8), torch.randint(0, 3, (16,))
    store = "memory://kernel-recompute-sdpa"
    with et.record(model, opt, store=store, gradients="recompute", checkpoint_every=4):
        for i in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(
                model(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4]
            ).backward()
            opt.step()
    outcome: list = []

    def replay() -> None:
        try:
            with et.open_trace(store) as trace:
                outcome.append([rs.index for rs in trace.replay(model=_Attention())])
        except Exception as e:  # handed to the test thread
            outcome.append(e)

    with math_attention():
        worker = threading.Thread(target=replay)
        worker.start()
        time.sleep(0.3)  # the replay is waiting for the lock, not running under MATH
    worker.join(timeout=60)
    assert outcome == [[0, 1, 2]]
