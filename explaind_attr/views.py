"""Typed containers for attribution views, each able to become a tidy DataFrame.

An `Attribution` holds the contributions of K named parts to every (test input,
explained output) row and the total they are meant to add up to, so its completeness
residual is one property away. A `JointView` holds a two-way split (e.g. data group ×
component) together with the labels of both axes; its marginals are sums over one axis.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import ViewError

__all__ = ["Attribution", "JointView", "tidy_frame"]


def tidy_frame(
    values: np.ndarray,
    output_names: Sequence[str],
    axes: Sequence[Mapping[str, Sequence[object]]],
) -> pd.DataFrame:
    """Flatten `values` [N, O, *A] into one row per cell.

    Columns: `test` (int), `output` (name), then for each trailing axis the columns of its
    mapping (column name → one label per index along that axis), then `value`.
    Rows are in C order (test, output, then the trailing axes).
    """
    values = np.asarray(values)
    if values.ndim != 2 + len(axes):
        raise ViewError(f"values of shape {values.shape} do not have 2 + {len(axes)} axes")
    idx = np.indices(values.shape).reshape(values.ndim, -1)
    cols: dict[str, object] = {
        "test": idx[0].astype(np.int64),
        "output": np.asarray(list(output_names), dtype=object)[idx[1]],
    }
    for ax, mapping in enumerate(axes):
        for name, labels in mapping.items():
            cols[name] = _column(labels)[idx[2 + ax]]
    cols["value"] = values.reshape(-1).astype(np.float64, copy=False)
    return pd.DataFrame(cols)


def _column(labels: Sequence[object]) -> np.ndarray:
    """Labels as a column that keeps each label's type: numbers stay numeric arrays; text or
    a mix (int sample ids next to term names) becomes an object array of the labels as given."""
    items = list(labels)
    arr = np.asarray(items)
    if arr.dtype.kind in "USO":
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
    return arr


@dataclass(frozen=True)
class Attribution:
    """Contributions of K named parts to each (test input, explained output) row.

    axis:    name of the part column in `to_frame()` ("sample", "group", "component", ...).
    labels:  the K part names; kinds: what each part is ("sample", "group", "param",
             "module", "slice", or "term" for the non-data terms of the decomposition).
    values:  [N, O, K] float64 contributions.
    total:   [N, O] what the parts add up to (f_T − f_0 for complete views), or None when
             the parts may overlap (user slices) and add up to nothing in particular.
    """

    axis: str
    labels: tuple[Hashable, ...]
    kinds: tuple[str, ...]
    values: np.ndarray
    total: np.ndarray | None
    output_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.values.ndim != 3:
            raise ViewError(f"values must be [N, O, K], got shape {self.values.shape}")
        k = self.values.shape[-1]
        if len(self.labels) != k or len(self.kinds) != k:
            raise ViewError(
                f"{len(self.labels)} labels and {len(self.kinds)} kinds for {k} parts; "
                "give one label and one kind per part"
            )
        if len(self.output_names) != self.values.shape[1]:
            raise ViewError(
                f"{len(self.output_names)} output names for {self.values.shape[1]} outputs"
            )
        if self.total is not None and self.total.shape != self.values.shape[:2]:
            raise ViewError(f"total has shape {self.total.shape}, expected {self.values.shape[:2]}")

    @property
    def residual(self) -> np.ndarray | None:
        """[N, O] total minus the sum of all parts (rounding only); None without a total."""
        if self.total is None:
            return None
        return self.total - self.values.sum(axis=-1)

    def max_residual(self) -> float:
        """max |residual| over all rows (0.0 for views without a total)."""
        res = self.residual
        return float(np.max(np.abs(res))) if res is not None and res.size else 0.0

    def of_kind(self, *kinds: str) -> Attribution:
        """The parts of the given kinds only (the total no longer applies: it becomes None)."""
        keep = [i for i, kind in enumerate(self.kinds) if kind in kinds]
        return Attribution(
            axis=self.axis,
            labels=tuple(self.labels[i] for i in keep),
            kinds=tuple(self.kinds[i] for i in keep),
            values=self.values[..., keep],
            total=None,
            output_names=self.output_names,
        )

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: columns test, output, <axis>, kind, value (one row per cell)."""
        return tidy_frame(
            self.values, self.output_names, [{self.axis: self.labels, "kind": self.kinds}]
        )


@dataclass(frozen=True)
class JointView:
    """A two-way split of contributions: values [N, O, R, C] over (rows, columns).

    row_axis / col_axis name the two axes ("group", "component" or "window"). Window axes
    carry their step boundaries in `edges` (len C+1 or R+1) and become the two columns
    window_start, window_stop in `to_frame()`.
    """

    row_axis: str
    col_axis: str
    row_labels: tuple[Hashable, ...]
    col_labels: tuple[Hashable, ...]
    values: np.ndarray
    output_names: tuple[str, ...]
    edges: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 4:
            raise ViewError(f"values must be [N, O, R, C], got shape {self.values.shape}")
        if self.values.shape[2:] != (len(self.row_labels), len(self.col_labels)):
            raise ViewError(
                f"values of shape {self.values.shape} do not fit {len(self.row_labels)} row "
                f"and {len(self.col_labels)} column labels"
            )
        if "window" in (self.row_axis, self.col_axis):
            n = len(self.col_labels) if self.col_axis == "window" else len(self.row_labels)
            if self.edges is None or len(self.edges) != n + 1:
                raise ViewError(f"a window axis of {n} windows needs {n + 1} edges")

    def row_marginal(self) -> np.ndarray:
        """[N, O, R]: the sum over columns."""
        return self.values.sum(axis=-1)

    def col_marginal(self) -> np.ndarray:
        """[N, O, C]: the sum over rows."""
        return self.values.sum(axis=-2)

    def _axis_columns(self, axis: str, labels: tuple[Hashable, ...]) -> dict[str, Sequence[object]]:
        if axis == "window":
            edges = self.edges or ()  # set whenever an axis is "window" (__post_init__)
            return {"window_start": edges[:-1], "window_stop": edges[1:]}
        return {axis: labels}

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: test, output, the two axes' columns, value (one row per cell)."""
        return tidy_frame(
            self.values,
            self.output_names,
            [
                self._axis_columns(self.row_axis, self.row_labels),
                self._axis_columns(self.col_axis, self.col_labels),
            ],
        )

    def to_array(self) -> np.ndarray:
        """The [N, O, R, C] array (labels in row_labels / col_labels)."""
        return self.values
