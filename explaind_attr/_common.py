"""Small helpers shared by the views: required slices, component selections, step edges."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from explaind_kernel.result import KernelResult

from .errors import MissingViewError, ViewError

_WHAT = {
    "sample_component": "data contributions per (training sample, parameter tensor)",
    "sample_window": "data contributions per (training sample, step window)",
    "component_window": "contributions per (component, step window)",
    "param_scores": "per-parameter-element influence scores",
}


def require(result: KernelResult, field: str) -> np.ndarray:
    """The joint slice `field` of the result, or MissingViewError naming the KeepOptions field."""
    value = getattr(result, field, None)
    if value is None:
        raise MissingViewError(
            f"this view needs {field} ({_WHAT.get(field, field)}), which the kernel result did "
            f"not keep; recompute with keep=KeepOptions({field}=True)"
        )
    return value


def total_change(result: KernelResult) -> np.ndarray:
    """[N, O] f_T − f_0: what every complete view adds up to."""
    return result.fT - result.f0


def param_indices(result: KernelResult) -> list[int]:
    """Indices of the parameter-tensor components (they partition the parameters)."""
    return [i for i, kind in enumerate(result.component_kinds) if kind == "param"]


def slice_indices(result: KernelResult) -> list[int]:
    """Indices of the user-slice components (they may overlap)."""
    return [i for i, kind in enumerate(result.component_kinds) if kind == "slice"]


def check_edges(edges: Sequence[int], num_steps: int) -> tuple[int, ...]:
    """Validate step-window boundaries: integers, strictly increasing, from 0 to T."""
    try:
        out = tuple(int(e) for e in edges)
    except (TypeError, ValueError) as e:
        raise ViewError(f"window edges must be integers, got {list(edges)!r}") from e
    if len(out) < 2 or out[0] != 0 or out[-1] != num_steps:
        raise ViewError(
            f"window edges must start at 0 and end at the number of steps T={num_steps}, "
            f"got {list(out)}"
        )
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ViewError(f"window edges must be strictly increasing, got {list(out)}")
    return out


def sum_steps(values: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """Sum a [..., T] per-step array into [..., W] windows given W+1 edges."""
    return np.add.reduceat(values, np.asarray(edges[:-1], dtype=np.intp), axis=-1)


def coarsen_windows(
    values: np.ndarray, kept_edges: Sequence[int], edges: Sequence[int] | None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Sum [..., W] kept windows into the coarser windows `edges` (a subset of kept_edges)."""
    kept = tuple(int(e) for e in kept_edges)
    if edges is None:
        return values, kept
    new = check_edges(edges, kept[-1])
    position = {e: i for i, e in enumerate(kept)}
    absent = [e for e in new if e not in position]
    if absent:
        raise ViewError(
            f"edges {absent} are not boundaries of the kept windows {list(kept)}; joint slices "
            "can only be summed into coarser windows: pick edges among the kept ones, or "
            "recompute the kernel with the window edges you need"
        )
    starts = np.asarray([position[e] for e in new[:-1]], dtype=np.intp)
    return np.add.reduceat(values, starts, axis=-1), new
