"""Groupings of training samples (by label, by source, ...) and sums over them.

A grouping is a mapping sample_id → group, a callable sample_id → group, or a pandas
Series indexed by sample id. Every training sample of the result must land in a group;
samples the grouping does not cover go to `default_group` when one is given, and raise
`GroupingError` otherwise. Missing means: absent from the mapping/Series, a NaN value in
the Series, or None returned by the callable.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import GroupingError

__all__ = ["Grouping", "GroupSpec", "resolve_groups", "sum_groups"]

#: What a caller may pass as a grouping of training samples.
GroupSpec = Mapping[str, Hashable] | Callable[[str], Hashable] | pd.Series

_SHOW_MISSING = 5


@dataclass(frozen=True)
class Grouping:
    """Training samples resolved into groups: `index[s]` is the group of sample s."""

    names: tuple[str, ...]
    index: np.ndarray  # [S] int64 group index per sample

    @property
    def sizes(self) -> np.ndarray:
        """[G] number of samples per group."""
        return np.bincount(self.index, minlength=len(self.names))


def _lookup(groups: GroupSpec, sample_id: str) -> Hashable | None:
    if isinstance(groups, pd.Series):
        if sample_id not in groups.index:
            return None
        value = groups.loc[sample_id]
        if isinstance(value, pd.Series):
            raise GroupingError(
                f"the groups Series lists sample {sample_id!r} {len(value)} times; "
                "give each sample id once (groups.index must be unique)"
            )
        return None if pd.isna(value) else value
    if isinstance(groups, Mapping):
        return groups.get(sample_id)
    if callable(groups):
        try:
            return groups(sample_id)
        except Exception as e:  # the user's callable: report which sample broke it
            raise GroupingError(
                f"the groups callable raised {type(e).__name__} for sample {sample_id!r}: {e}"
            ) from e
    raise GroupingError(
        f"groups must be a mapping sample_id → group, a callable, or a pandas Series; "
        f"got {type(groups).__name__}"
    )


def resolve_groups(
    sample_ids: Sequence[str],
    groups: GroupSpec | None,
    *,
    default_group: Hashable | None = None,
) -> Grouping:
    """Assign every sample id to a group; `groups=None` makes each sample its own group.

    Group names are `str(group)`, ordered by sorting the group values when they are
    mutually comparable, by first appearance otherwise.
    """
    if groups is None:
        return Grouping(names=tuple(sample_ids), index=np.arange(len(sample_ids), dtype=np.int64))
    assigned: list[Hashable] = []
    missing: list[str] = []
    for sid in sample_ids:
        value = _lookup(groups, sid)
        if value is None:
            if default_group is None:
                missing.append(sid)
                continue
            value = default_group
        assigned.append(value)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:_SHOW_MISSING])
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        raise GroupingError(
            f"the grouping covers {len(sample_ids) - len(missing)} of {len(sample_ids)} "
            f"training samples; {len(missing)} missing: {shown}{more}. Add them to the "
            "grouping, or pass default_group='other' to collect them in one group."
        )
    unique = list(dict.fromkeys(assigned))
    try:
        unique = sorted(unique)  # type: ignore[type-var]
    except TypeError:
        pass
    names = tuple(str(u) for u in unique)
    if len(set(names)) != len(names):
        raise GroupingError(
            f"distinct groups share a name once written as text: {list(names)}; "
            "use group values whose str() differ"
        )
    position = {u: i for i, u in enumerate(unique)}
    index = np.fromiter((position[a] for a in assigned), dtype=np.int64, count=len(assigned))
    return Grouping(names=names, index=index)


def sum_groups(values: np.ndarray, grouping: Grouping, axis: int = -1) -> np.ndarray:
    """Sum `values` along `axis` (one entry per sample) into one entry per group."""
    values = np.moveaxis(np.asarray(values), axis, -1)
    if values.shape[-1] != len(grouping.index):
        raise GroupingError(
            f"{values.shape[-1]} samples along the grouped axis but the grouping has "
            f"{len(grouping.index)}"
        )
    order = np.argsort(grouping.index, kind="stable")
    starts = np.searchsorted(grouping.index[order], np.arange(len(grouping.names)))
    nonempty = grouping.sizes > 0
    out = np.zeros(values.shape[:-1] + (len(grouping.names),), dtype=np.float64)
    if nonempty.any():
        out[..., nonempty] = np.add.reduceat(values[..., order], starts[nonempty], axis=-1)
    return np.moveaxis(out, -1, axis)
