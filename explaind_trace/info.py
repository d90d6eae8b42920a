"""A short summary of a trace, for ``explaind info`` and for humans."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .ddp import check_rank, check_rank_steps, rank_specs
from .errors import ExplaindError, TraceCorruptError
from .reader import TraceReader, open_trace

if TYPE_CHECKING:
    import torch
from .stores import Store, open_store

__all__ = [
    "describe",
    "format_info",
    "StoreReport",
    "VerifyReport",
    "verify_trace",
    "format_verify",
    "verify_error",
]

NEEDS_MODEL = (
    "not checked here: gradients are recomputed from the recorded forwards, which needs the "
    "model; θ and every gradient (against its fingerprint) are verified when the kernel "
    "replays the trace, or by trace.check_drift(model=...)"
)


VERIFY_NOTE = (
    "records only: θ is not rebuilt here, its gradients are recomputed from the recorded "
    "forwards, which needs the model; θ and every gradient (against its fingerprint) are "
    "verified when the kernel replays the trace, or by trace.check_drift(model=...)"
)


def describe(
    spec: Store | str | os.PathLike[str],
    *,
    check_drift: bool = True,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Facts about the trace at ``spec``: steps, checkpoints, sizes, compression, drift.

    ``compression_ratio`` is the raw size of what the trace records per step (gradients
    as fp32 plus the input batches as given) over the bytes it stored. ``check_drift``
    replays the whole trace (can take a while on long runs); a trace recorded with
    ``gradients="recompute"``/``"auto"`` only with ``model`` (the traced architecture: each
    gradient is recomputed and checked), else ``drift_note`` says so. A ``Store`` instance
    is left open (it is the caller's).
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
            "gradients": trace.gradients,
            "gradients_stored_from": trace.gradients_stored_from,
            "gradients_switch_reason": prog.get("gradients_switch_reason"),
            "drift": None,
        }
        if trace.needs_model and model is None:  # replay recomputes gradients: needs a model
            info["drift_note"] = NEEDS_MODEL
        elif check_drift and trace.num_steps > 0:
            report = trace.check_drift(model=model)
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


def _gradients(d: dict[str, Any]) -> str:
    """The gradients row: how they were recorded (RecordOptions.gradients) and their codec."""
    codec_text = f"{d['grad_codec']} (LOSSY: replay is approximate)" if d["lossy"] else "lossless"
    mode, since = d.get("gradients", "stored"), d.get("gradients_stored_from")
    if mode == "stored":
        return f"stored, {codec_text}"
    if mode == "recompute":
        return "recompute: not stored, recomputed from the forwards (a fingerprint per step)"
    if since is None:
        return "auto: recomputed (checked while recording at every checkpoint: equal)"
    done = f"recomputed steps 0..{since - 1}, " if since > 0 else ""
    why = d.get("gradients_switch_reason") or "?"
    return f"auto: {done}stored from step {since} ({codec_text}), because {why}"


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
        ("gradients", _gradients(d)),
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
    elif d.get("drift_note"):
        rows.append(("replay drift", d["drift_note"]))
    rows.append(
        (
            "written by",
            f"explaind {d['library_version']}, torch {d['torch_version']}, {d['created']}",
        )
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@dataclass
class StoreReport:
    """What ``verify_trace`` found in one store (a DDP trace has one per rank)."""

    store: str
    rank: int
    steps: int  # committed steps the store's progress record announces
    intact_steps: int = 0  # leading steps 0..intact_steps-1 that read back whole
    records: int = 0  # records checked
    bytes: int = 0  # stored bytes checked
    damaged: dict[str, str] = field(default_factory=dict)  # key -> what is wrong

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def last_intact_step(self) -> int | None:
        """The last step t such that steps 0..t all read back whole (None: not even step 0)."""
        return self.intact_steps - 1 if self.intact_steps > 0 else None


@dataclass
class VerifyReport:
    """What ``verify_trace`` found: every damaged record and how far the trace reads intact,
    over every rank's store of a DDP trace (``stores[r]`` is rank ``r``'s)."""

    trace: str
    stores: list[StoreReport]
    seconds: float = 0.0
    #: what was not verified here (gradients recomputed at replay: θ needs the model)
    note: str | None = None

    @property
    def steps(self) -> int:
        """Committed steps rank 0's progress record announces."""
        return self.stores[0].steps

    @property
    def intact_steps(self) -> int:
        """Leading steps that read back whole on every rank."""
        return min(s.intact_steps for s in self.stores)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.stores)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.stores)

    @property
    def damaged(self) -> dict[str, str]:
        """Every damaged record: rank 0's by key, another rank's as ``rank{r}:{key}``."""
        return {
            (k if s.rank == 0 else f"rank{s.rank}:{k}"): why
            for s in self.stores
            for k, why in s.damaged.items()
        }

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stores)

    @property
    def last_intact_step(self) -> int | None:
        """The last step t such that steps 0..t all read back whole (None: not even step 0)."""
        return self.intact_steps - 1 if self.intact_steps > 0 else None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def verify_trace(
    spec: Store | str | os.PathLike[str], *, model: torch.nn.Module | None = None
) -> VerifyReport:
    """Read back and check every record of the trace at ``spec`` (a DDP trace: every rank's).

    Each record is decoded in full (checksums, tensor sizes, structure); a record that does
    not read is listed in ``damaged`` with the reason, and the scan goes on; a rank's store
    that does not open, or belongs to another run, is reported as damaged for that rank.
    Raises only when rank 0's store cannot be opened at all (its header or progress record
    is unreadable). A trace recorded with ``gradients="recompute"``/``"auto"``: with
    ``model`` its replay runs too (every gradient recomputed and checked against its
    fingerprint; a mismatch raises ``GradientMismatchError``), without it ``note`` says that
    θ was not checked.
    """
    t0 = time.perf_counter()
    store = open_store(spec, readonly=True)
    try:
        trace = TraceReader(store, name=str(spec) if not isinstance(spec, Store) else repr(store))
        report = VerifyReport(trace=trace.name, stores=[_verify_store(trace)])
        if trace.needs_model and model is None:
            report.note = VERIFY_NOTE
        elif trace.needs_model and report.ok:
            drift = trace.check_drift(model=model)
            report.note = "θ rebuilt with the model: every gradient matched its fingerprint, " + (
                "bitwise at every checkpoint" if drift.exact else "with drift"
            )
        if trace.meta.world_size > 1:
            for r, where in enumerate(rank_specs(trace, spec), start=1):
                report.stores.append(_verify_rank(trace, r, where))
    finally:
        if not isinstance(spec, Store):
            store.close()
    report.seconds = time.perf_counter() - t0
    return report


def _verify_rank(rank0: TraceReader, r: int, where: str) -> StoreReport:
    """Verify rank ``r``'s store of a DDP trace; a store that does not open is damaged."""
    try:
        store = open_store(where, readonly=True)
    except ExplaindError as e:
        return StoreReport(where, r, 0, damaged={"meta": _one_line(e)})
    try:
        trace = TraceReader(store, name=where)
        check_rank(rank0, r, trace)
        check_rank_steps(rank0.name, [rank0.num_steps, trace.num_steps])
    except ExplaindError as e:
        store.close()
        return StoreReport(where, r, 0, damaged={"meta": _one_line(e)})
    try:
        return _verify_store(trace)
    finally:
        store.close()


#: the key under which ``verify_trace`` reports a store whose records cannot all be listed
LISTING = "(record list)"


def _listable(store: Store, prefix: str) -> list[str]:
    try:
        return list(store.keys(prefix))
    except ExplaindError:
        return []


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _check(report: StoreReport, key: str, read: Any) -> bool:
    try:
        read()
    except ExplaindError as e:
        report.damaged.setdefault(key, _one_line(e))
        return False
    return True


def _verify_store(trace: TraceReader) -> StoreReport:
    """Verify every record of one store (a DDP rank's reader is not merged with the others)."""
    rank = trace.meta.rank
    report = StoreReport(trace.name, rank, trace.num_steps)
    store = trace.store
    committed = set()
    try:
        listed = list(store.keys())
    except ExplaindError as e:  # a damaged page: check what the header says must be there
        report.damaged[LISTING] = _one_line(e)
        listed = [
            *(k for k in _listable(store, "sample/")),
            *(k for k in _listable(store, "rng/")),
            *(f"step/{t:08d}" for t in range(trace.num_steps)),
        ]
    for key in listed:
        try:
            value = store.get(key)
        except ExplaindError as e:  # the store's own checks (an LMDB page) refuse it
            report.damaged[key] = _one_line(e)
            continue
        report.records += 1
        report.bytes += len(value) if value is not None else 0
        committed.add(key)
    for key in sorted(k for k in committed if k.startswith("sample/")):
        _check(report, key, lambda k=key: trace.sample(k.split("/", 1)[1]))
    for key in sorted(k for k in committed if k.startswith("rng/")):
        _check(report, key, lambda k=key: trace.rng_bases(int(k.split("/", 1)[1])))
    ckpts = set(trace.checkpoint_steps)
    every = trace.meta.checkpoint_every
    for t in range(0, trace.num_steps, every) if rank == 0 else ():  # ranks > 0: forwards
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
    read = trace.step if rank == 0 else (lambda t: trace._forwards(trace._raw_step(t)))
    intact = True
    for t in range(trace.num_steps):
        good = _check(report, f"step/{t:08d}", lambda t=t: read(t))
        if intact and good and f"ckpt/{t:08d}" not in report.damaged:
            report.intact_steps = t + 1
        else:
            intact = False
    return report


def _store_lines(r: StoreReport, width: int) -> list[str]:
    last = "none" if r.last_intact_step is None else str(r.last_intact_step)
    lines = [
        f"{'intact'.ljust(width)}  steps 0..{last} of {r.steps}"
        if r.intact_steps
        else f"{'intact'.ljust(width)}  no step of {r.steps} reads back",
    ]
    if r.ok:
        lines.append(f"{'damaged'.ljust(width)}  none")
    else:
        lines.append(f"{'damaged'.ljust(width)}  {len(r.damaged)} record(s):")
        lines += [f"  {key}: {why}" for key, why in sorted(r.damaged.items())]
    return lines


def format_verify(r: VerifyReport) -> str:
    """Render a ``VerifyReport`` as text lines (the damaged records first); a DDP trace
    gets one section per rank."""
    lines = [
        f"verified  {r.records} records, {_size(r.bytes)} in {r.seconds:.2f} s "
        f"({r.mb_per_s:.1f} MB/s)"
        + (f" over {len(r.stores)} ranks' stores" if len(r.stores) > 1 else ""),
    ]
    if r.note:
        lines.append(f"note      {r.note}")
    if len(r.stores) == 1:
        return "\n".join(lines + _store_lines(r.stores[0], 8))
    last = "no step" if r.last_intact_step is None else f"steps 0..{r.last_intact_step}"
    lines.append(f"intact    {last} of {r.steps} on every rank")
    for s in r.stores:
        lines.append(f"rank {s.rank}    {s.store}")
        lines += ["  " + line for line in _store_lines(s, 8)]
    return "\n".join(lines)


def verify_error(r: VerifyReport) -> TraceCorruptError:
    """The error ``explaind info --verify`` ends with when records are damaged."""
    last = "no step" if r.last_intact_step is None else f"steps 0..{r.last_intact_step}"
    keys = sorted(r.damaged)
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    where = " on every rank" if len(r.stores) > 1 else ""
    return TraceCorruptError(
        f"{r.trace}: {len(keys)} damaged record(s) ({shown}); {last} of {r.steps} read back "
        f"intact{where}. Restore the trace from a copy, or use only the intact steps."
    )
