"""Named phases of training (step ranges such as "memorisation" and "generalisation"): which
model components and which training samples drove the explained outputs in each.

A phase's contribution of a component is the sum of its kept step windows
(`component_window`), of a sample the sum of its windows (`sample_window`); phase
boundaries must be window edges of the result (pass them in `step_windows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from explaind_kernel.result import KernelResult

from ..errors import ViewError

__all__ = ["Phase", "phase_table"]

Phase = tuple[str, int, int]  # (name, first step, stop step)


def _window_span(result: KernelResult, start: int, stop: int) -> slice:
    edges = list(result.window_edges)
    if start not in edges or stop not in edges or not start < stop:
        raise ViewError(
            f"phase [{start}, {stop}) does not lie on the result's window edges {edges}; pass "
            "the phase boundaries in step_windows when computing the kernel"
        )
    return slice(edges.index(start), edges.index(stop))


def phase_table(
    result: KernelResult,
    phases: Sequence[Phase],
    *,
    component_groups: Mapping[str, Sequence[str]] | None = None,
    top: int = 3,
    reduce: str = "mean",
) -> pd.DataFrame:
    """One row per phase: steps, the change of the explained value, the `top` component
    groups (or parameter tensors) and training samples by their contribution in the phase.

    reduce: "mean" (signed mean over the (input, output) rows: for comparable targets such
    as one margin or loss per input) or "abs" (mean |·|: rows of different classes).
    """
    agg = (
        (lambda v: v.mean(axis=(0, 1)))
        if reduce == "mean"
        else (lambda v: np.abs(v).mean(axis=(0, 1)))
    )
    names = list(result.component_names)
    groups = dict(component_groups) if component_groups else {n: [n] for n in names}
    position = {n: c for c, n in enumerate(names)}
    rows = []
    for name, start, stop in phases:
        span = _window_span(result, int(start), int(stop))
        change = agg(result.step_total[..., int(start) : int(stop)].sum(-1, keepdims=True))[0]
        row = {"phase": name, "steps": f"{start}–{stop}", "change": float(change)}
        if result.component_window is not None:
            cw = result.component_window[..., span].sum(-1)  # [N, O, C]
            per_group = {
                g: agg(cw[..., [position[m] for m in members]].sum(-1, keepdims=True))[0]
                for g, members in groups.items()
            }
            best = sorted(per_group, key=lambda g: -abs(per_group[g]))[:top]
            row["components"] = ", ".join(f"{g} ({per_group[g]:+.3g})" for g in best)
        if result.sample_window is not None:
            sw = agg(result.sample_window[..., span].sum(-1))  # [S]
            best = np.argsort(-sw, kind="stable")[:top]
            row["top samples"] = ", ".join(f"{result.sample_ids[s]} ({sw[s]:+.3g})" for s in best)
        rows.append(row)
    return pd.DataFrame(rows)
