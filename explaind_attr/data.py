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
    labels = np.asarray(parts.labels, dtype=object)
    records: list[tuple[int, str, str, int, str, float]] = []
    n, o = values.shape[:2]
    for i in range(n):
        for j in range(o):
            row = values[i, j]
            for role, order in (
                ("proponent", np.argsort(-row, kind="stable")),
                ("opponent", np.argsort(row, kind="stable")),
            ):
                sign = 1.0 if role == "proponent" else -1.0
                chosen = [s for s in order[:k] if sign * row[s] > 0]
                for rank, s in enumerate(chosen, start=1):
                    records.append(
                        (i, result.output_names[j], role, rank, labels[s], float(row[s]))
                    )
    return pd.DataFrame.from_records(
        records, columns=["test", "output", "role", "rank", view.axis, "value"]
    )
