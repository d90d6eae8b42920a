"""A short summary of a trace, for ``explaind info`` and for humans."""

from __future__ import annotations

import os
from typing import Any

from .reader import open_trace
from .stores import Store

__all__ = ["describe", "format_info"]


def describe(spec: Store | str | os.PathLike[str], *, check_drift: bool = True) -> dict[str, Any]:
    """Facts about the trace at ``spec``: steps, checkpoints, sizes, compression, drift.

    ``compression_ratio`` is the raw size of what the trace records per step (gradients
    as fp32 plus the input batches as given) over the bytes it stored. ``check_drift``
    replays the whole trace (can take a while on long runs).
    """
    with open_trace(spec) as trace:
        meta = trace.meta
        prog = trace.progress
        stored = int(prog.get("stored_bytes", 0))
        raw = int(prog.get("raw_bytes", 0))
        info: dict[str, Any] = {
            "trace": str(spec) if not isinstance(spec, Store) else repr(spec),
            "schema_version": meta.schema_version,
            "created": meta.created,
            "library_version": meta.library_version,
            "torch_version": meta.torch_version,
            "model_class": meta.model_class,
            "steps": trace.num_steps,
            "skipped_steps": int(prog.get("skipped", 0)),
            "finished": trace.finished,
            "has_final": bool(prog.get("final", False)),
            "error": trace.error,
            "checkpoints": list(trace.checkpoint_steps),
            "checkpoint_every": meta.checkpoint_every,
            "param_tensors": len(meta.params),
            "parameters": sum(_numel(p.shape) for p in meta.params),
            "buffers": len(meta.buffers),
            "optimizer": meta.optimizer.class_name,
            "param_groups": len(meta.optimizer.groups),
            "output_module": meta.output_module,
            "grad_codec": meta.grad_codec,
            "lossy": meta.lossy,
            "bytes_on_disk": trace.store.nbytes(),
            "stored_bytes": stored,
            "raw_bytes": raw,
            "compression_ratio": (raw / stored) if stored else None,
            "drift": None,
        }
        if check_drift and trace.num_steps > 0:
            report = trace.check_drift()
            info["drift"] = {
                "exact": report.exact,
                "max_abs_diff": report.max_abs_diff,
                "checked": sorted(report.checkpoints),
            }
    return info


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_info(d: dict[str, Any]) -> str:
    """Render ``describe()``'s dictionary as aligned text lines."""
    status = (
        "finished" if d["finished"] else ("stopped by an error" if d["error"] else "interrupted")
    )
    ckpts = d["checkpoints"]
    shown = ", ".join(map(str, ckpts[:8])) + (", ..." if len(ckpts) > 8 else "")
    ratio = d["compression_ratio"]
    rows = [
        ("trace", d["trace"]),
        ("status", status + (f" ({d['error']})" if d["error"] else "")),
        ("steps", f"{d['steps']} committed, {d['skipped_steps']} skipped"),
        ("checkpoints", f"{len(ckpts)} every {d['checkpoint_every']} steps [{shown}]"),
        (
            "model",
            f"{d['model_class']}: {d['parameters']:,} parameters in {d['param_tensors']} tensors, {d['buffers']} buffers",
        ),
        ("optimizer", f"{d['optimizer']} ({d['param_groups']} param group(s))"),
        (
            "gradients",
            f"{d['grad_codec']} (LOSSY: replay is approximate)" if d["lossy"] else "lossless",
        ),
        ("on disk", _size(d["bytes_on_disk"])),
        (
            "stored",
            f"{_size(d['stored_bytes'])} for {_size(d['raw_bytes'])} raw"
            + (f" (compression {ratio:.2f}x)" if ratio else ""),
        ),
    ]
    drift = d.get("drift")
    if drift is not None:
        text = (
            "exact (bitwise at every checkpoint)"
            if drift["exact"]
            else f"max abs diff {drift['max_abs_diff']:.3g}"
        )
        rows.append(("replay drift", text))
    rows.append(
        (
            "written by",
            f"explaind {d['library_version']}, torch {d['torch_version']}, {d['created']}",
        )
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
