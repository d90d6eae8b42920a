"""explaind_attr: data, model and training attributions read off a KernelResult.

Views return typed results (`Attribution`, `JointView`, `StepAttribution`) that carry
their completeness residual and become tidy pandas DataFrames with `to_frame()`;
`build_report` writes the whole story as HTML/markdown/CSV/PNG.

Public names are imported on first use (PEP 562), so `explaind --help` and the error
classes do not pull in torch, pandas or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AttributionError,
    ExplaindError,
    GroupingError,
    MissingViewError,
    PruningError,
    ReportError,
    ResultMismatchError,
    UsageError,
    ViewError,
)

_LAZY = {
    "data": ("data_attribution", "top_samples"),
    "explanation": ("Explanation", "explain"),
    "groups": ("Grouping", "resolve_groups", "sum_groups"),
    "joint": ("component_window_view", "group_component_view", "group_window_view"),
    "model": (
        "component_attribution",
        "module_attribution",
        "module_of",
        "param_score_table",
        "param_score_vector",
        "param_scores",
        "slice_attribution",
    ),
    "pruning": ("PruneCurve", "prune_copy", "prune_curve", "prune_curves", "ranking_scores"),
    "report": ("ReportPaths", "build_report", "samples_from_trace"),
    "results": (
        "check_result_matches",
        "load_result",
        "reuse_mismatch",
        "saved_result_for",
        "trace_id_of",
    ),
    "influence": ("self_influence", "self_influence_of"),
    "training": (
        "StepAttribution",
        "cumulative_curve",
        "phase_boundaries",
        "step_attribution",
        "step_edges",
    ),
    "views": ("Attribution", "JointView"),
}
_OWNER = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "ExplaindError",
    "AttributionError",
    "GroupingError",
    "MissingViewError",
    "PruningError",
    "ReportError",
    "ResultMismatchError",
    "UsageError",
    "ViewError",
    "Attribution",
    "Explanation",
    "Grouping",
    "JointView",
    "PruneCurve",
    "ReportPaths",
    "StepAttribution",
    "build_report",
    "samples_from_trace",
    "check_result_matches",
    "component_attribution",
    "component_window_view",
    "cumulative_curve",
    "data_attribution",
    "explain",
    "group_component_view",
    "group_window_view",
    "load_result",
    "saved_result_for",
    "reuse_mismatch",
    "self_influence",
    "self_influence_of",
    "module_attribution",
    "module_of",
    "param_score_table",
    "param_score_vector",
    "param_scores",
    "phase_boundaries",
    "prune_copy",
    "prune_curve",
    "prune_curves",
    "ranking_scores",
    "resolve_groups",
    "slice_attribution",
    "step_attribution",
    "step_edges",
    "sum_groups",
    "top_samples",
    "trace_id_of",
]


def __getattr__(name: str) -> Any:
    module = _OWNER.get(name)
    if module is None:
        raise AttributeError(f"module 'explaind_attr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .data import data_attribution, top_samples
    from .explanation import Explanation, explain
    from .groups import Grouping, resolve_groups, sum_groups
    from .influence import self_influence, self_influence_of
    from .joint import component_window_view, group_component_view, group_window_view
    from .model import (
        component_attribution,
        module_attribution,
        module_of,
        param_score_table,
        param_score_vector,
        param_scores,
        slice_attribution,
    )
    from .pruning import PruneCurve, prune_copy, prune_curve, prune_curves, ranking_scores
    from .report import ReportPaths, build_report, samples_from_trace
    from .results import (
        check_result_matches,
        load_result,
        reuse_mismatch,
        saved_result_for,
        trace_id_of,
    )
    from .training import (
        StepAttribution,
        cumulative_curve,
        phase_boundaries,
        step_attribution,
        step_edges,
    )
    from .views import Attribution, JointView
