"""Data attribution: signed contributions of training samples (or groups of them).

The non-data terms of the decomposition (weight decay, non-data gradient, initial
optimizer state, optimizer residual, quadrature error, buffer drift) are their own rows
with kind="term"; they are never folded into the samples. With them, the rows of every
(test, output) add up to f_T − f_0.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pandas as pd

from explaind_kernel.result import TERM_FIELDS, KernelResult

from ._common import total_change
from .errors import ViewError
from .groups import GroupSpec, resolve_groups, sum_groups
from .views import Attribution

__all__ = ["data_attribution", "top_samples"]


def data_attribution(
    result: KernelResult,
    *,
    groups: GroupSpec | None = None,
    default_group: Hashable | None = None,
) -> Attribution:
    """Contributions per training sample (or per group), plus one row per non-data term.

    groups: None (one row per sample), a mapping sample_id → group, a callable
        sample_id → group, or a pandas Series indexed by sample id.
    default_group: the group of samples the grouping does not cover (else GroupingError).
    The rows add up to f_T − f_0 for every (test, output); `residual` is what is left.
    """
    grouping = resolve_groups(result.sample_ids, groups, default_group=default_group)
    part = result.data if groups is None else sum_groups(result.data, grouping)
    terms = np.stack([getattr(result, name) for name in TERM_FIELDS], axis=-1)
    kind = "sample" if groups is None else "group"
    return Attribution(
        axis=kind,
        labels=grouping.names + TERM_FIELDS,
        kinds=(kind,) * len(grouping.names) + ("term",) * len(TERM_FIELDS),
        values=np.concatenate([part, terms], axis=-1),
        total=total_change(result),
        output_names=tuple(result.output_names),
    )


def top_samples(
    result: KernelResult,
    k: int = 10,
    *,
    groups: GroupSpec | None = None,
    default_group: Hashable | None = None,
) -> pd.DataFrame:
    """Top-k proponents and opponents per (test, output).

    Proponents are the k largest strictly positive contributions (pushing the output up),
    opponents the k most negative ones; a row may list fewer when fewer have that sign.
    Ties keep the order of `result.sample_ids` (stable sort), so tables are reproducible.
    Columns: test, output, role ("proponent" | "opponent"), rank (1 = strongest),
    sample (or group), value.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ViewError(f"k must be a positive integer, got {k!r}")
    view = data_attribution(result, groups=groups, default_group=default_group)
    parts = view.of_kind(view.axis)
    values = parts.values
    labels = parts.labels
    records: list[tuple[int, int, bool, int, str, float]] = []
    for sign in (1.0, -1.0):
        order = np.argsort(-sign * values, axis=-1, kind="stable")[..., :k]  # [N, O, k]
        chosen = np.take_along_axis(values, order, axis=-1)
        for (i, j, rank), s in np.ndenumerate(order):
            value = float(chosen[i, j, rank])
            if sign * value > 0:
                records.append((i, j, sign < 0, rank + 1, labels[s], value))
    records.sort(key=lambda rec: rec[:4])  # test, output, proponents first, rank
    return pd.DataFrame.from_records(
        [
            (i, result.output_names[j], "opponent" if opp else "proponent", rank, label, value)
            for i, j, opp, rank, label, value in records
        ],
        columns=["test", "output", "role", "rank", view.axis, "value"],
    )
