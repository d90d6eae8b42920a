"""Model attribution: contributions per parameter tensor, per module, per user slice.

A parameter tensor's contribution is Σ_t J̄_t[c]·Δθ_t[c]; the tensors partition the
parameters, so with the two terms that are not a product J̄·Δθ — the quadrature error
and the buffer drift, shown as their own rows (kind="term") — the rows add up to
f_T − f_0. User slices ("slice:NAME") may overlap, so their view has no total.

The parameter-wise influence scores of the paper (result.param_scores: per element,
Σ over rows |Σ_t J̄_t ⊙ Δθ_t|, larger = more influential) are exposed as arrays and tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from explaind_kernel.result import KernelResult

from ._common import param_indices, require, slice_indices, total_change
from .errors import ViewError
from .views import Attribution

__all__ = [
    "component_attribution",
    "module_attribution",
    "module_of",
    "param_score_table",
    "param_score_vector",
    "param_scores",
    "slice_attribution",
]

_SPECIAL = ("quadrature_error", "buffer_drift")
ROOT_MODULE = "(root)"


def _param_part(
    result: KernelResult, part: Literal["all", "data"]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...], np.ndarray]:
    """(values [N,O,Cp], special [N,O,k], special names, param names, total) for `part`."""
    idx = param_indices(result)
    names = tuple(result.component_names[i] for i in idx)
    if part == "all":
        special = np.stack([getattr(result, s) for s in _SPECIAL], axis=-1)
        return result.components[..., idx], special, _SPECIAL, names, total_change(result)
    if part == "data":
        empty = np.zeros(result.f0.shape + (0,))
        return result.component_data[..., idx], empty, (), names, result.data_total
    raise ViewError(f"part must be 'all' or 'data', got {part!r}")


def component_attribution(
    result: KernelResult, *, part: Literal["all", "data"] = "all"
) -> Attribution:
    """Contributions per parameter tensor, plus quadrature and drift rows (kind="term").

    part="all": everything that moved each tensor (data, decay, non-data, residual);
        the rows add up to f_T − f_0.
    part="data": only the training-data part of each tensor; rows add up to the data total.
    """
    values, special, special_names, names, total = _param_part(result, part)
    return Attribution(
        axis="component",
        labels=names + special_names,
        kinds=("param",) * len(names) + ("term",) * len(special_names),
        values=np.concatenate([values, special], axis=-1),
        total=total,
        output_names=tuple(result.output_names),
    )


def module_of(param_name: str, level: int | None = None) -> str:
    """The module owning a parameter: its name up to the last '.' ("(root)" when none).

    level=k keeps only the first k dot-separated parts of that module path, so
    "encoder.layer.0.attn.weight" is in "encoder.layer.0.attn", or "encoder" at level 1.
    """
    module = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    if level is not None and module:
        module = ".".join(module.split(".")[:level])
    return module or ROOT_MODULE


def module_attribution(
    result: KernelResult,
    *,
    level: int | None = None,
    part: Literal["all", "data"] = "all",
) -> Attribution:
    """Contributions per module (the sum of its parameter tensors), plus special rows.

    level: None for the full module path, k ≥ 1 to merge modules below depth k.
    Modules are listed in the order their first parameter appears.
    """
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 1):
        raise ViewError(f"level must be None or an integer ≥ 1, got {level!r}")
    values, special, special_names, names, total = _param_part(result, part)
    owners = [module_of(name, level) for name in names]
    modules = tuple(dict.fromkeys(owners))
    position = {m: i for i, m in enumerate(modules)}
    summed = np.zeros(values.shape[:2] + (len(modules),))
    for c, owner in enumerate(owners):
        summed[..., position[owner]] += values[..., c]
    return Attribution(
        axis="module",
        labels=modules + special_names,
        kinds=("module",) * len(modules) + ("term",) * len(special_names),
        values=np.concatenate([summed, special], axis=-1),
        total=total,
        output_names=tuple(result.output_names),
    )


def slice_attribution(result: KernelResult, *, part: Literal["all", "data"] = "all") -> Attribution:
    """Contributions per user slice ("slice:NAME" components; the prefix is dropped).

    Slices may overlap, so the view has no total and no residual.
    """
    idx = slice_indices(result)
    if not idx:
        raise ViewError(
            "the kernel result has no user slices; pass slices to compute_kernel to get them"
        )
    if part not in ("all", "data"):
        raise ViewError(f"part must be 'all' or 'data', got {part!r}")
    source = result.components if part == "all" else result.component_data
    names = tuple(result.component_names[i].removeprefix("slice:") for i in idx)
    return Attribution(
        axis="slice",
        labels=names,
        kinds=("slice",) * len(names),
        values=source[..., idx],
        total=None,
        output_names=tuple(result.output_names),
    )


# ------------------------------------------------------------------ influence scores


def param_scores(
    result: KernelResult, *, names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The per-element influence scores, name → array of the parameter's shape."""
    scores = require(result, "param_scores")
    if names is None:
        return dict(scores)
    unknown = [n for n in names if n not in scores]
    if unknown:
        raise ViewError(f"no influence scores for {unknown}; scored parameters: {sorted(scores)}")
    return {n: scores[n] for n in names}


def param_score_vector(result: KernelResult, *, names: Sequence[str] | None = None) -> np.ndarray:
    """All scores flattened (C order) and concatenated in `names` order (default: result order)."""
    scores = param_scores(result, names=names)
    if not scores:
        return np.zeros(0)
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in scores.values()])


def param_score_table(
    result: KernelResult,
    *,
    per: Literal["tensor", "element"] = "tensor",
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Influence scores as a table.

    per="tensor": one row per parameter tensor — param, numel, total, mean, max, share
        (its fraction of all scores).
    per="element": one row per element — param, index (flat, C order), score, rank
        (1 = most influential over all listed tensors; ties keep flat order).
    """
    scores = param_scores(result, names=names)
    if per == "tensor":
        grand = sum(float(np.sum(v)) for v in scores.values()) or 1.0
        rows = [
            (
                name,
                int(np.size(v)),
                float(np.sum(v)),
                float(np.mean(v)) if np.size(v) else 0.0,
                float(np.max(v)) if np.size(v) else 0.0,
                float(np.sum(v)) / grand,
            )
            for name, v in scores.items()
        ]
        return pd.DataFrame.from_records(
            rows, columns=["param", "numel", "total", "mean", "max", "share"]
        )
    if per == "element":
        flat = [np.asarray(v, dtype=np.float64).reshape(-1) for v in scores.values()]
        values = np.concatenate(flat) if flat else np.zeros(0)
        order = np.argsort(-values, kind="stable")
        rank = np.empty(len(values), dtype=np.int64)
        rank[order] = np.arange(1, len(values) + 1)
        return pd.DataFrame(
            {
                "param": np.repeat(np.asarray(list(scores), dtype=object), [len(f) for f in flat]),
                "index": np.concatenate([np.arange(len(f)) for f in flat]) if flat else [],
                "score": values,
                "rank": rank,
            }
        )
    raise ViewError(f"per must be 'tensor' or 'element', got {per!r}")
