"""Errors raised by explaind_attr. Each message says what happened, why, and what to do."""

from __future__ import annotations

from explaind_trace.errors import ExplaindError

__all__ = [
    "ExplaindError",
    "AttributionError",
    "MissingViewError",
    "GroupingError",
    "ViewError",
    "ResultMismatchError",
    "PruningError",
    "ReportError",
    "UsageError",
]


class AttributionError(ExplaindError):
    """Base class of every error explaind_attr raises."""


class MissingViewError(AttributionError):
    """A view needs a joint slice (or score) the kernel result did not keep."""


class GroupingError(AttributionError):
    """A grouping of training samples is incomplete or malformed."""


class ViewError(AttributionError):
    """A view was asked for with arguments that do not fit the result (edges, k, level, ...)."""


class ResultMismatchError(AttributionError):
    """A kernel result was computed from another trace than the one at hand."""


class PruningError(AttributionError):
    """A pruning curve cannot be computed with the given model, scores or mask."""


class ReportError(AttributionError):
    """A report cannot be written (bad output directory, unusable sample rows, ...)."""


class UsageError(AttributionError):
    """A command-line argument cannot be resolved (module, factory, input file, ...)."""
