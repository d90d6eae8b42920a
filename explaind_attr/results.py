"""Saved kernel results: reload one (msgpack, no pickle) and reuse it only when it answers
the question at hand.

A result answers a question fixed by three things, all recorded in it: the trace
(`result.trace_id`, `TraceReader.trace_id`), the kernel configuration (`result.config`)
and the test inputs with their targets — outputs, labels, output names, slices
(`result.extra["inputs_digest"]`, `explaind_kernel.inputs.problem_digest`). `saved_result_for`
reuses a saved result only when all three match, and says which one does not otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from explaind_kernel.result import KernelResult

from .errors import ResultMismatchError

__all__ = [
    "check_result_matches",
    "load_result",
    "reuse_mismatch",
    "saved_result_for",
    "trace_id_of",
]

log = logging.getLogger(__name__)

#: Configuration fields that cannot change a result's numbers (how it is computed, not what).
IGNORED_CONFIG = frozenset({"progress", "prefetch", "cpu_threads"})


def trace_id_of(trace: Any) -> str:
    """The trace id of a string, a KernelResult, or an open trace reader.

    A string is taken as the id itself; an object with a `trace_id` string (a KernelResult,
    a `TraceReader`) gives that; any other reader (an object with `meta`) is fingerprinted
    the way the engine fingerprints it.
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


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def reuse_mismatch(
    result: KernelResult,
    *,
    trace_id: str,
    config: Any = None,
    digest: str | None = None,
) -> str | None:
    """Why `result` does not answer the question (trace id, config, inputs digest); None when
    it does. `config` (a KernelConfig or its dict) and `digest` are checked when given."""
    if result.trace_id != trace_id:
        return f"it comes from trace {result.trace_id!r}, not from trace {trace_id!r}"
    want = _config_dict(config)
    if want:
        keys = (set(want) | set(result.config)) - IGNORED_CONFIG
        differ = sorted(k for k in keys if result.config.get(k) != want.get(k))
        if differ:
            k = differ[0]
            return (
                f"its kernel configuration differs in {differ} (e.g. {k}: saved "
                f"{result.config.get(k)!r}, asked {want.get(k)!r})"
            )
    if digest is not None:
        saved = result.extra.get("inputs_digest")
        if saved is None:
            return "it records no digest of its test inputs and targets (an older result)"
        if saved != digest:
            return "it was computed for other test inputs or targets (outputs, labels, slices)"
    return None


def saved_result_for(
    path: str | Path,
    trace: Any,
    inputs: Any = None,
    *,
    outputs: Any = "all",
    labels: Any = None,
    output_names: Any = None,
    slices: Any = None,
    config: Any = None,
    **options: Any,
) -> KernelResult | None:
    """The result saved at `path` when it answers exactly this question — the trace at
    `trace` (a path/URL or an open reader), the configuration (`config` or keyword options,
    as compute_kernel takes them) and the test `inputs` with their targets (as
    compute_kernel takes them) — else None, logging a warning that says what differs, so
    the caller recomputes. With `inputs=None` only the trace and the configuration are
    checked (and the configuration only when one is given)."""
    if not Path(path).is_file():
        return None
    from explaind_kernel.config import KernelConfig, resolve_config
    from explaind_kernel.inputs import problem_digest
    from explaind_trace import open_trace

    cfg: KernelConfig | None = None
    if config is not None or options:
        cfg = resolve_config(config, options, "saved_result_for")
    result = KernelResult.load(path)
    owned = not hasattr(trace, "meta")
    reader = open_trace(trace) if owned else trace
    try:
        digest = None
        if inputs is not None:
            digest = problem_digest(
                reader,
                inputs,
                outputs=outputs,
                labels=labels,
                output_names=output_names,
                slices=slices,
            )
        why = reuse_mismatch(result, trace_id=trace_id_of(reader), config=cfg, digest=digest)
    finally:
        if owned:
            reader.close()
    if why is not None:
        log.warning("not reusing the kernel result %s: %s; computing a new one", path, why)
        return None
    return result
