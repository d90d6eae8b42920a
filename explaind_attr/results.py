"""Saved kernel results: reload one (msgpack, no pickle) and check it fits the trace at hand."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from explaind_kernel.result import KernelResult

from .errors import ResultMismatchError

__all__ = ["check_result_matches", "load_result", "saved_result_for", "trace_id_of"]

log = logging.getLogger(__name__)


def trace_id_of(trace: Any) -> str:
    """The trace id of a string, a KernelResult, or an open trace reader.

    A string is taken as the id itself; an object with a `trace_id` string gives that; a
    reader (an object with `meta`) gives `explaind_kernel.trace_fingerprint(reader)`, the
    id the engine stores in every result.
    """
    if isinstance(trace, str):
        return trace
    value = getattr(trace, "trace_id", None)
    if isinstance(value, str) and value:
        return value
    if getattr(trace, "meta", None) is not None:
        from explaind_kernel.engine import trace_fingerprint

        try:
            return trace_fingerprint(trace)
        except (AttributeError, TypeError, ValueError) as e:
            raise ResultMismatchError(
                f"cannot fingerprint the trace {trace!r} ({e}); pass its id string instead"
            ) from e
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


def saved_result_for(
    path: str | Path, trace: str, num_inputs: int | None = None
) -> KernelResult | None:
    """The result saved at `path` when it was computed from the trace at `trace` (and on
    `num_inputs` test inputs, when given); None when there is none, so the caller recomputes."""
    if not Path(path).is_file():
        return None
    from explaind_trace import open_trace

    with open_trace(trace) as reader:
        try:
            result = load_result(path, trace_id=reader)
        except ResultMismatchError as e:
            log.warning("not reusing %s: %s", path, e)
            return None
    if num_inputs is not None and result.num_inputs != num_inputs:
        return None
    return result
