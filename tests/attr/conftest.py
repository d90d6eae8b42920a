"""Synthetic kernel results that satisfy every completeness identity exactly.

`make_result` draws the finest-grained pieces at random — data contributions per
(sample, parameter tensor, step) and non-data contributions per (term, tensor, step) —
and defines every array of the KernelResult as a sum of them, so all marginals agree by
construction (up to float64 summation order, hence the tolerance below).
"""

from __future__ import annotations

import numpy as np
import pytest

from explaind_kernel.result import KeepOptions, KernelResult

#: Views are sums of the same float64 numbers in another order: rounding only.
ATOL = 1e-10

KEEP_ALL = KeepOptions(
    sample_component=True, sample_window=True, component_window=True, param_scores=True
)
NONDATA_TERMS = ("weight_decay", "nondata", "initial_state", "residual")


def param_names(c: int) -> list[str]:
    """C parameter names over nested modules, the last one at the root when C ≥ 3."""
    names = [f"net.layer{i // 2}.{('weight', 'bias')[i % 2]}" for i in range(c)]
    if c >= 3:
        names[-1] = "scale"
    return names


def _shape(name: str) -> tuple[int, ...]:
    if name.endswith("weight"):
        return (3, 2)
    if name.endswith("bias"):
        return (3,)
    return (1,)


def _windows(x: np.ndarray, edges: list[int]) -> np.ndarray:
    return np.add.reduceat(x, np.asarray(edges[:-1]), axis=-1)


def make_result(
    N: int = 2,
    O: int = 3,  # noqa: E741 - the axis names of the brief
    S: int = 10,
    C: int = 4,
    T: int = 12,
    W: int = 3,
    seed: int = 0,
    *,
    n_slices: int = 2,
    keep: KeepOptions = KEEP_ALL,
    trace_id: str = "trace-A",
) -> KernelResult:
    """A random KernelResult [N inputs, O outputs, S samples, C tensors, T steps, W windows]."""
    if not 1 <= W <= T:
        raise ValueError("need 1 ≤ W ≤ T")
    rng = np.random.default_rng(seed)
    names = param_names(C)
    seen = rng.random((S, T)) < 0.4
    seen[np.arange(S), rng.integers(0, T, S)] = True  # every sample is seen at least once
    x = rng.normal(size=(N, O, S, C, T)) * seen[None, None, :, None, :]  # data pieces
    y = {t: rng.normal(scale=0.1, size=(N, O, C, T)) for t in NONDATA_TERMS}
    quad = rng.normal(scale=1e-3, size=(N, O, T))
    drift = rng.normal(scale=1e-3, size=(N, O, T))
    interior = sorted(int(e) for e in rng.choice(np.arange(1, T), W - 1, replace=False))
    edges = [0, *interior, T]

    path = x.sum(axis=2) + sum(y.values())  # [N, O, C, T]: Σ_t J̄_t[c]·Δθ_t[c]
    weights = rng.random((n_slices, C)) * (rng.random((n_slices, C)) < 0.7)
    slice_path = np.einsum("kc,noct->nokt", weights, path)
    slice_data = np.einsum("kc,nosct->nok", weights, x)
    all_path = np.concatenate([path, slice_path], axis=2)

    f0 = rng.normal(size=(N, O))
    data = x.sum(axis=(3, 4))
    totals = {t: y[t].sum(axis=(2, 3)) for t in NONDATA_TERMS}
    fT = f0 + data.sum(-1) + sum(totals.values()) + quad.sum(-1) + drift.sum(-1)
    return KernelResult(
        trace_id=trace_id,
        config={"quadrature": "gauss:2", "seed": seed},
        output_names=[f"class{j}" for j in range(O)],
        sample_ids=[f"s{i:03d}" for i in range(S)],
        component_names=names + [f"slice:part{k}" for k in range(n_slices)],
        component_kinds=["param"] * C + ["slice"] * n_slices,
        window_edges=edges,
        num_steps=T,
        f0=f0,
        fT=fT,
        **totals,
        quadrature_error=quad.sum(-1),
        buffer_drift=drift.sum(-1),
        data=data,
        step_data=x.sum(axis=(2, 3)),
        **{f"step_{t}": y[t].sum(axis=2) for t in NONDATA_TERMS},
        step_quadrature_error=quad,
        step_buffer_drift=drift,
        components=all_path.sum(-1),
        component_data=np.concatenate([x.sum(axis=(2, 4)), slice_data], axis=-1),
        sample_component=x.sum(axis=4) if keep.sample_component else None,
        sample_window=_windows(x.sum(axis=3), edges) if keep.sample_window else None,
        component_window=_windows(all_path, edges) if keep.component_window else None,
        param_scores=({n: rng.random(_shape(n)) for n in names} if keep.param_scores else None),
        step_nodes=np.full(T, 2, dtype=np.int64),
    )


@pytest.fixture
def synth():
    """The `make_result` factory, for tests that need other shapes or keep options."""
    return make_result


@pytest.fixture
def assert_close():
    """Compare arrays at ATOL: views re-sum the same float64 numbers in another order."""

    def check(actual, expected) -> None:
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=ATOL)

    return check


@pytest.fixture
def result() -> KernelResult:
    return make_result()


@pytest.fixture
def labels(result: KernelResult) -> dict[str, int]:
    """A label per training sample (three classes)."""
    return {sid: i % 3 for i, sid in enumerate(result.sample_ids)}
