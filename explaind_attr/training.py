"""Training attribution: contributions per step, per window of steps, cumulative curves,
and automatic phase boundaries.

Per step t the result splits the measured change f(θ_{t+1}) − f(θ_t) into terms (data,
weight decay, non-data, initial state, residual, quadrature error, buffer drift); a window
sums its steps, so every windowing adds up to f_T − f_0.

Phase boundaries (`phase_boundaries`) follow one of two documented rules, per (test, output):

* rule="sign": d_t = f(θ_{t+1}) − f(θ_t) is smoothed by a centred moving average of
  `smooth` steps (shrunk at both ends); a phase starts at step t (1 ≤ t < T) where the sign
  of the smoothed change differs from the sign at step t−1. Exact zeros carry the previous
  sign (leading zeros take the first non-zero one), so a flat stretch is no boundary.
* rule="dominant": in every kept step window, the dominant component is the parameter
  tensor with the largest |contribution| (component_window; ties → the first listed); a
  phase starts at the first step of a window whose dominant component differs from the
  previous window's.

Boundaries closer than `min_gap` steps to the previously kept one are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from explaind_kernel.result import STEP_FIELDS, KernelResult

from ._common import check_edges, param_indices, require, sum_steps, total_change
from .errors import ViewError
from .views import tidy_frame

__all__ = [
    "StepAttribution",
    "cumulative_curve",
    "phase_boundaries",
    "step_attribution",
    "step_edges",
]

#: Names of the per-step terms, in STEP_FIELDS order ("data", "weight_decay", ...).
STEP_TERMS = tuple(name.removeprefix("step_") for name in STEP_FIELDS)


@dataclass(frozen=True)
class StepAttribution:
    """Contributions per step window and term: values [N, O, W, F].

    edges: W+1 step boundaries (window w covers steps edges[w] ≤ t < edges[w+1]);
    terms: the F term names; total: [N, O] f_T − f_0.
    """

    edges: tuple[int, ...]
    terms: tuple[str, ...]
    values: np.ndarray
    total: np.ndarray
    output_names: tuple[str, ...]

    def __post_init__(self) -> None:
        expected = self.total.shape + (len(self.edges) - 1, len(self.terms))
        if self.values.shape != expected:
            raise ViewError(f"values have shape {self.values.shape}, expected {expected}")

    @property
    def per_window(self) -> np.ndarray:
        """[N, O, W] the change of f over each window (all terms)."""
        return self.values.sum(axis=-1)

    @property
    def residual(self) -> np.ndarray:
        """[N, O] f_T − f_0 minus the sum over windows and terms (rounding only)."""
        return self.total - self.values.sum(axis=(-1, -2))

    def cumulative(self) -> np.ndarray:
        """[N, O, W+1] change of f since θ_0 at every edge (0 at edge 0)."""
        c = np.cumsum(self.per_window, axis=-1)
        return np.concatenate([np.zeros(c.shape[:-1] + (1,)), c], axis=-1)

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: test, output, window_start, window_stop, term, value."""
        return tidy_frame(
            self.values,
            self.output_names,
            [
                {"window_start": self.edges[:-1], "window_stop": self.edges[1:]},
                {"term": self.terms},
            ],
        )


def step_edges(result: KernelResult, edges: Sequence[int] | int | str = "steps") -> tuple[int, ...]:
    """Resolve a window choice into W+1 step boundaries.

    "steps": every step is a window; "windows": the result's window_edges; an int k:
    windows of k steps (the last may be shorter); a sequence: explicit boundaries from 0 to T.
    """
    t = int(result.num_steps)
    if isinstance(edges, str):
        if edges == "steps":
            return tuple(range(t + 1))
        if edges == "windows":
            return check_edges(result.window_edges, t)
        raise ViewError(f"edges must be 'steps', 'windows', an int or a sequence, got {edges!r}")
    if isinstance(edges, int | np.integer) and not isinstance(edges, bool):
        if edges < 1:
            raise ViewError(f"a window length must be ≥ 1 step, got {edges}")
        return tuple(range(0, t, int(edges))) + (t,)
    return check_edges(edges, t)


def step_attribution(
    result: KernelResult, *, edges: Sequence[int] | int | str = "steps"
) -> StepAttribution:
    """Per-step (or per-window) contributions of every term; see `step_edges` for `edges`."""
    bounds = step_edges(result, edges)
    stacked = np.stack([getattr(result, name) for name in STEP_FIELDS], axis=-1)  # [N,O,T,F]
    windows = sum_steps(np.moveaxis(stacked, -1, -2), bounds)  # [N,O,F,W]
    return StepAttribution(
        edges=bounds,
        terms=STEP_TERMS,
        values=np.moveaxis(windows, -2, -1),
        total=total_change(result),
        output_names=tuple(result.output_names),
    )


def cumulative_curve(
    result: KernelResult,
    *,
    edges: Sequence[int] | int | str = "steps",
    by_term: bool = False,
) -> pd.DataFrame:
    """Cumulative curves over training, one row per (test, output, edge[, term]).

    by_term=False: value is the reconstructed output after `step` steps, f_0 plus every
        contribution so far (step 0 gives f_0, the last step f_T up to the residual).
    by_term=True: value is each term's cumulative contribution since θ_0 (no f_0).
    """
    view = step_attribution(result, edges=edges)
    if by_term:
        c = np.cumsum(view.values, axis=-2)
        c = np.concatenate([np.zeros(c.shape[:2] + (1,) + c.shape[3:]), c], axis=-2)
        return tidy_frame(c, view.output_names, [{"step": view.edges}, {"term": view.terms}])
    curve = result.f0[..., None] + view.cumulative()
    return tidy_frame(curve, view.output_names, [{"step": view.edges}])


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average along the last axis, the window shrunk at both ends."""
    t = x.shape[-1]
    lo, hi = (width - 1) // 2, width // 2
    c = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x, axis=-1)], axis=-1)
    start = np.clip(np.arange(t) - lo, 0, t)
    stop = np.clip(np.arange(t) + hi + 1, 0, t)
    return (c[..., stop] - c[..., start]) / (stop - start)


def _carry_signs(s: np.ndarray) -> np.ndarray:
    """Replace zeros by the previous non-zero sign (leading zeros: the first non-zero one)."""
    out = s.copy()
    nonzero = np.flatnonzero(out)
    if nonzero.size == 0:
        return out
    out[: nonzero[0]] = out[nonzero[0]]
    for i in range(nonzero[0] + 1, len(out)):
        if out[i] == 0:
            out[i] = out[i - 1]
    return out


def _debounce(points: list[tuple[int, str, str]], min_gap: int) -> list[tuple[int, str, str]]:
    kept: list[tuple[int, str, str]] = []
    for p in points:
        if not kept or p[0] - kept[-1][0] >= min_gap:
            kept.append(p)
    return kept


def phase_boundaries(
    result: KernelResult,
    *,
    rule: Literal["sign", "dominant"] = "sign",
    smooth: int = 5,
    min_gap: int = 1,
) -> pd.DataFrame:
    """Steps where a new training phase starts, per (test, output); rules in the module doc.

    Columns: test, output, step (first step of the new phase), rule, before, after
    ("+"/"-" for the sign rule, component names for the dominant rule).
    """
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ViewError(f"smooth must be a positive number of steps, got {smooth!r}")
    if isinstance(min_gap, bool) or not isinstance(min_gap, int) or min_gap < 1:
        raise ViewError(f"min_gap must be a positive number of steps, got {min_gap!r}")
    records: list[tuple[int, str, int, str, str, str]] = []
    n, o = result.f0.shape
    if rule == "sign":
        signs = np.sign(_moving_average(result.step_total, smooth))
        symbol = {1.0: "+", -1.0: "-", 0.0: "0"}
        for i in range(n):
            for j in range(o):
                s = _carry_signs(signs[i, j])
                points = [
                    (t, symbol[float(s[t - 1])], symbol[float(s[t])])
                    for t in range(1, len(s))
                    if s[t] != s[t - 1]
                ]
                for t, before, after in _debounce(points, min_gap):
                    records.append((i, result.output_names[j], t, rule, before, after))
    elif rule == "dominant":
        cw = require(result, "component_window")
        idx = param_indices(result)
        names = [result.component_names[c] for c in idx]
        dominant = np.argmax(np.abs(cw[:, :, idx, :]), axis=2)  # [N, O, W]
        edges = [int(e) for e in result.window_edges]
        for i in range(n):
            for j in range(o):
                d = dominant[i, j]
                points = [
                    (edges[w], names[d[w - 1]], names[d[w]])
                    for w in range(1, len(d))
                    if d[w] != d[w - 1]
                ]
                for t, before, after in _debounce(points, min_gap):
                    records.append((i, result.output_names[j], t, rule, before, after))
    else:
        raise ViewError(f"rule must be 'sign' or 'dominant', got {rule!r}")
    return pd.DataFrame.from_records(
        records, columns=["test", "output", "step", "rule", "before", "after"]
    )
