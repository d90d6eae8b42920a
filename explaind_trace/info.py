"""A short summary of a trace, for ``explaind info`` and for humans."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ExplaindError, TraceCorruptError
from .reader import TraceReader, open_trace
from .stores import Store

__all__ = ["describe", "format_info", "VerifyReport", "verify_trace", "format_verify"]


def describe(spec: Store | str | os.PathLike[str], *, check_drift: bool = True) -> dict[str, Any]:
    """Facts about the trace at ``spec``: steps, checkpoints, sizes, compression, drift.

    ``compression_ratio`` is the raw size of what the trace records per step (gradients
    as fp32 plus the input batches as given) over the bytes it stored. ``check_drift``
    replays the whole trace (can take a while on long runs). A ``Store`` instance is left
    open (it is the caller's).
    """
    with _opened(spec) as trace:
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
            "cotangent_codec": meta.options.cotangent_codec,
            "lossy": meta.lossy,
            "bytes_on_disk": trace.store.nbytes(),
            "stored_bytes": stored,
            "raw_bytes": raw,
            "compression_ratio": (raw / stored) if stored else None,
            "bytes_per_step": _per_step(prog, trace.num_steps),
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


@contextlib.contextmanager
def _opened(spec: Store | str | os.PathLike[str]) -> Iterator[TraceReader]:
    """``open_trace(spec)``, closed afterwards unless ``spec`` is the caller's own store."""
    trace = open_trace(spec)
    try:
        yield trace
    finally:
        if not isinstance(spec, Store):
            trace.close()


def _per_step(progress: dict[str, Any], steps: int) -> dict[str, float] | None:
    """Stored bytes per committed step by kind (``encoder.KINDS``: tensor payloads; "other"
    is the rest: record structure, ids, hyperparameters, seals); None for traces written
    before the progress record counted kinds."""
    kinds = progress.get("kind_bytes")
    if not isinstance(kinds, dict) or steps <= 0:
        return None
    out = {k: v / steps for k, v in kinds.items()}
    out["other"] = max(int(progress.get("stored_bytes", 0)) - sum(kinds.values()), 0) / steps
    return out


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
        ("status", status + (f": {d['error']}" if d["error"] else "")),
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
        (
            "cotangents",
            "generic (tensor codec)"
            if d.get("cotangent_codec", "generic") == "generic"
            else "auto (cross-entropy codec: rebuilt from the replayed logits, lossless)",
        ),
        ("on disk", _size(d["bytes_on_disk"])),
        (
            "stored",
            f"{_size(d['stored_bytes'])} for {_size(d['raw_bytes'])} raw"
            + (f" (compression {ratio:.2f}x)" if ratio else ""),
        ),
    ]
    per = d.get("bytes_per_step")
    if per:
        shown = [f"{k} {_size(round(v))}" for k, v in per.items() if v > 0]
        rows.append(("per step", ", ".join(shown) or "nothing"))
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


@dataclass
class VerifyReport:
    """What ``verify_trace`` found: every damaged record and how far the trace reads intact."""

    trace: str
    steps: int  # committed steps the progress record announces
    intact_steps: int  # leading steps 0..intact_steps-1 that read back whole
    records: int = 0  # records checked
    bytes: int = 0  # stored bytes checked
    seconds: float = 0.0
    damaged: dict[str, str] = field(default_factory=dict)  # key -> what is wrong

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def last_intact_step(self) -> int | None:
        """The last step t such that steps 0..t all read back whole (None: not even step 0)."""
        return self.intact_steps - 1 if self.intact_steps > 0 else None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def verify_trace(spec: Store | str | os.PathLike[str]) -> VerifyReport:
    """Read back and check every record of the trace at ``spec``.

    Each record is decoded in full (checksums, tensor sizes, structure); a record that does
    not read is listed in ``damaged`` with the reason, and the scan goes on. Raises only when
    the trace cannot be opened at all (its header or progress record is unreadable).
    """
    t0 = time.perf_counter()
    with _opened(spec) as trace:
        report = VerifyReport(trace=trace.name, steps=trace.num_steps, intact_steps=0)
        _verify_records(trace, report)
    report.seconds = time.perf_counter() - t0
    return report


def _check(report: VerifyReport, key: str, read: Any) -> bool:
    try:
        read()
    except ExplaindError as e:
        report.damaged.setdefault(key, " ".join(str(e).split()))
        return False
    return True


def _verify_records(trace: TraceReader, report: VerifyReport) -> None:
    store = trace.store
    committed = set()
    for key in store.keys():
        value = store.get(key)
        report.records += 1
        report.bytes += len(value) if value is not None else 0
        committed.add(key)
    for key in sorted(k for k in committed if k.startswith("sample/")):
        _check(report, key, lambda k=key: trace.sample(k.split("/", 1)[1]))
    ckpts = set(trace.checkpoint_steps)
    every = trace.meta.checkpoint_every
    for t in range(0, trace.num_steps, every):
        if t not in ckpts:
            report.damaged[f"ckpt/{t:08d}"] = (
                f"{trace.name}: record 'ckpt/{t:08d}' is missing (the trace keeps a checkpoint "
                f"every {every} steps); restore it from a copy of the trace."
            )
    for t in sorted(ckpts):
        _check(report, f"ckpt/{t:08d}", lambda t=t: trace.checkpoint(t))
    if trace.progress.get("final", False):
        _check(report, "final", trace.final)
    for n in range(int(trace.progress.get("skipped", 0))):
        key = f"skip/{n:08d}"
        _check(report, key, lambda n=n: trace.skip(n))
    intact = True
    for t in range(trace.num_steps):
        good = _check(report, f"step/{t:08d}", lambda t=t: trace.step(t))
        if intact and good and f"ckpt/{t:08d}" not in report.damaged:
            report.intact_steps = t + 1
        else:
            intact = False


def format_verify(r: VerifyReport) -> str:
    """Render a ``VerifyReport`` as text lines (the damaged records first)."""
    last = "none" if r.last_intact_step is None else str(r.last_intact_step)
    lines = [
        f"verified  {r.records} records, {_size(r.bytes)} in {r.seconds:.2f} s "
        f"({r.mb_per_s:.1f} MB/s)",
        f"intact    steps 0..{last} of {r.steps}"
        if r.intact_steps
        else f"intact    no step of {r.steps} reads back",
    ]
    if r.ok:
        lines.append("damaged   none")
    else:
        lines.append(f"damaged   {len(r.damaged)} record(s):")
        lines += [f"  {key}: {why}" for key, why in sorted(r.damaged.items())]
    return "\n".join(lines)


def verify_error(r: VerifyReport) -> TraceCorruptError:
    """The error ``explaind info --verify`` ends with when records are damaged."""
    last = "no step" if r.last_intact_step is None else f"steps 0..{r.last_intact_step}"
    keys = sorted(r.damaged)
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return TraceCorruptError(
        f"{r.trace}: {len(keys)} damaged record(s) ({shown}); {last} of {r.steps} read back "
        "intact. Restore the trace from a copy, or use only the intact steps."
    )
