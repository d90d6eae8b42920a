"""Saved kernel results: reload one (msgpack, no pickle) and check it fits the trace at hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from explaind_kernel.result import KernelResult

from .errors import ResultMismatchError

__all__ = ["check_result_matches", "load_result", "trace_id_of"]


def trace_id_of(trace: Any) -> str:
    """The trace id of a string, a TraceReader-like object or a KernelResult.

    Looks for `trace_id` on the object, then on its `meta`, then `meta.fingerprint`.
    """
    if isinstance(trace, str):
        return trace
    for owner in (trace, getattr(trace, "meta", None)):
        for attr in ("trace_id", "fingerprint"):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, str) and value:
                return value
    raise ResultMismatchError(
        f"cannot tell the trace id of a {type(trace).__name__}; pass the id string itself"
    )


def check_result_matches(result: KernelResult, trace_id: str | Any) -> None:
    """Raise ResultMismatchError unless `result` was computed from the trace `trace_id`."""
    expected = trace_id_of(trace_id)
    if result.trace_id != expected:
        raise ResultMismatchError(
            f"the kernel result comes from trace {result.trace_id!r}, not from trace "
            f"{expected!r}; recompute it for this trace (explaind kernel TRACE ...) or load "
            "the result that belongs to it"
        )


def load_result(path: str | Path, *, trace_id: str | Any | None = None) -> KernelResult:
    """Read a saved KernelResult (never runs code from the file); check its trace when given."""
    result = KernelResult.load(path)
    if trace_id is not None:
        check_result_matches(result, trace_id)
    return result
