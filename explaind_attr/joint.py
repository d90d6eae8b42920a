"""Joint views: data group × component, component × step window, data group × step window.

Each reads a joint slice the engine kept (KeepOptions) and returns a `JointView`: an
[N, O, R, C] array with the labels of both axes, and a tidy DataFrame via `to_frame()`
with columns among test, output, group, component, window_start, window_stop, value.
A slice that was not kept raises MissingViewError naming the KeepOptions field to set.

Marginals: group × component sums over components to the group totals of the data and
over groups to `component_data`; component × window sums over windows to `components`
and, over parameter tensors, to the windowed path contributions; group × window sums over
windows to the group totals and over groups to the windowed `step_data`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

from explaind_kernel.result import KernelResult

from ._common import coarsen_windows, param_indices, require, slice_indices
from .errors import ViewError
from .groups import GroupSpec, resolve_groups, sum_groups
from .views import JointView

__all__ = ["component_window_view", "group_component_view", "group_window_view"]


def _window_labels(edges: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:]))


def group_component_view(
    result: KernelResult,
    *,
    groups: GroupSpec | None = None,
    default_group: Hashable | None = None,
) -> JointView:
    """Data contributions per (group of training samples, parameter tensor).

    groups=None keeps one row per training sample. Needs KeepOptions(sample_component=True).
    """
    sc = require(result, "sample_component")  # [N, O, S, Cp]
    grouping = resolve_groups(result.sample_ids, groups, default_group=default_group)
    values = sc if groups is None else sum_groups(sc, grouping, axis=2)
    names = tuple(result.component_names[i] for i in param_indices(result))
    if values.shape[-1] != len(names):
        raise ViewError(
            f"sample_component has {values.shape[-1]} components but the result lists "
            f"{len(names)} parameter tensors"
        )
    return JointView(
        row_axis="group",
        col_axis="component",
        row_labels=grouping.names,
        col_labels=names,
        values=values,
        output_names=tuple(result.output_names),
    )


def component_window_view(
    result: KernelResult,
    *,
    edges: Sequence[int] | None = None,
    components: Literal["param", "slice", "all"] = "param",
) -> JointView:
    """Path contributions per (component, step window).

    edges: None for the kept windows, or a coarser subset of result.window_edges.
    components: "param" (tensors, which partition the parameters), "slice" or "all".
    Needs KeepOptions(component_window=True).
    """
    cw = require(result, "component_window")  # [N, O, C, W]
    if components == "param":
        idx = param_indices(result)
    elif components == "slice":
        idx = slice_indices(result)
    elif components == "all":
        idx = list(range(len(result.component_names)))
    else:
        raise ViewError(f"components must be 'param', 'slice' or 'all', got {components!r}")
    values, bounds = coarsen_windows(cw[:, :, idx, :], result.window_edges, edges)
    return JointView(
        row_axis="component",
        col_axis="window",
        row_labels=tuple(result.component_names[i] for i in idx),
        col_labels=_window_labels(bounds),
        values=values,
        output_names=tuple(result.output_names),
        edges=bounds,
    )


def group_window_view(
    result: KernelResult,
    *,
    groups: GroupSpec | None = None,
    default_group: Hashable | None = None,
    edges: Sequence[int] | None = None,
) -> JointView:
    """Data contributions per (group of training samples, step window).

    edges: None for the kept windows, or a coarser subset of result.window_edges.
    Needs KeepOptions(sample_window=True).
    """
    sw = require(result, "sample_window")  # [N, O, S, W]
    grouping = resolve_groups(result.sample_ids, groups, default_group=default_group)
    values = sw if groups is None else sum_groups(sw, grouping, axis=2)
    values, bounds = coarsen_windows(values, result.window_edges, edges)
    return JointView(
        row_axis="group",
        col_axis="window",
        row_labels=grouping.names,
        col_labels=_window_labels(bounds),
        values=values,
        output_names=tuple(result.output_names),
        edges=bounds,
    )
