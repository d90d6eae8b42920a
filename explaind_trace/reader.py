"""Read a trace: metadata, steps, checkpoints, samples; rebuild θ_t by optimizer replay.

Each record is decoded by the module that also encodes it (``header.py``, ``steps.py``,
``state.py``); the samples live in ``samples.py``; a DDP trace's ranks are merged with
``ddp.py``; replay (``replay.py``) reads through the ``ReplaySource`` protocol this meets.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import msgpack
import torch

from . import codec
from .bounds import HeaderBounds
from .ddp import check_ranks, open_rank_stores
from .errors import NotATraceError, TraceCorruptError, TraceMismatchError
from .header import decode_header
from .optimizers import qualified_name
from .recompute import GradientRecompute
from .records import Checkpoint, ForwardRecord, SkipRecord, StepRecord
from .replay import DriftReport, ReplayStep, replay_steps
from .rngstates import RngBases
from .samples import SampleRows
from .schema import FINAL, META, PROGRESS, ckpt_key, key_index, skip_key, step_key
from .state import decode_state
from .steps import check_step, decode_forwards, decode_skip, decode_step, decode_update
from .stores import Store, open_store

__all__ = ["TraceReader", "open_trace"]

logger = logging.getLogger(__name__)


class TraceReader:
    """Read-only access to a recorded trace (see docs/architecture.md §3)."""

    def __init__(self, store: Store, *, name: str = "") -> None:
        self.store = store
        self.name = name or repr(store)
        raw = store.get(META)
        if raw is None:
            raise NotATraceError(f"{self.name} holds no trace (no meta record).")
        self.meta = decode_header(codec.unpack(raw, where=f"{self.name}: record 'meta'"), self.name)
        #: whether every record carries a checksum (the header says so; older traces: no)
        self.sealed = self.meta.checksum is not None
        self.bounds = HeaderBounds(self.meta)
        prog = store.get(PROGRESS)
        if prog is None and next(iter(store.keys("step/")), None) is not None:
            raise TraceCorruptError(
                f"{self.name}: record 'progress' is missing but step records are present, so "
                "which steps were committed is unknown. Restore the trace from a copy."
            )
        self.progress = (
            _check_progress(self._unpack(PROGRESS, prog), self.name)
            if prog is not None
            else {"steps": 0}
        )
        self.num_steps = int(self.progress.get("steps", 0))
        self.finished = bool(self.progress.get("finished", False))
        self.error: str | None = self.progress.get("error")
        self.lossy = self.meta.lossy
        self.param_names = [p.name for p in self.meta.params]
        self.buffer_names = [b.name for b in self.meta.buffers]
        self.group_of = {n: gi for gi, g in enumerate(self.meta.optimizer.groups) for n in g.params}
        self.checkpoint_steps = sorted(
            t for t in (key_index(k) for k in store.keys("ckpt/")) if t < self.num_steps
        )
        if self.num_steps and self.meta.rank == 0 and 0 not in self.checkpoint_steps:
            raise TraceCorruptError(
                f"{self.name}: record 'ckpt/00000000' (the state every replay starts from) is "
                "missing. Restore the trace from a copy."
            )
        self.samples = SampleRows(
            store, self._raw_forwards, name=self.name, sealed=self.sealed, bounds=self.bounds
        )
        #: the base RNG states forwards are stored against (``rngstates.py``)
        self.rng_bases = RngBases(self._get, self.bounds.rng, name=self.name)
        self._drift: DriftReport | None = None
        self._ranks: list[TraceReader] = []  # DDP: readers of ranks 1..world_size-1
        # buffers_at: the buffers of each step of two segments, the last one asked for and its
        # nearest (the kernel asks for a segment's steps and for the step before it)
        self._buffer_segments: dict[int, list[dict[str, torch.Tensor]]] = {}
        if self.lossy:
            logger.warning(
                "%s stores gradients lossily (%s): replay is approximate, drift is expected",
                self.name,
                self.meta.grad_codec,
            )

    @property
    def trace_id(self) -> str:
        """The trace's identity: a 24-hex blake2b of its header (the meta record), the id
        every kernel result carries so that results of another trace are refused."""
        raw = msgpack.packb(self.meta.raw, use_bin_type=True)
        return hashlib.blake2b(raw, digest_size=12).hexdigest()

    # -- plumbing -------------------------------------------------------------------------

    def _where(self, key: str) -> str:
        return f"{self.name}: record {key!r}"

    def _unpack(self, key: str, raw: bytes) -> Any:
        return codec.unpack(raw, where=self._where(key), sealed=self.sealed)

    def _get(self, key: str) -> Any:
        raw = self.store.get(key)
        if raw is None:
            raise TraceCorruptError(
                f"{self._where(key)} is missing; restore the trace from a copy "
                "(`explaind info --verify` lists what is intact)."
            )
        return self._unpack(key, raw)

    def close(self) -> None:
        """Close the underlying store (and the other ranks' stores of a DDP trace)."""
        try:
            for rr in self._ranks:
                rr.store.close()
        finally:
            self.store.close()

    def _attach_ranks(self, ranks: list[TraceReader]) -> None:
        """Merge the stores of ranks 1.. of a DDP trace (checked against this, rank 0's)."""
        common = check_ranks(self, ranks)
        self._ranks = ranks
        if common < self.num_steps:
            # the last step is not complete on every rank: drop it, with rank 0's final state
            self.num_steps = common
            self.progress = {**self.progress, "steps": common, "final": False, "finished": False}
            self.finished = False
            self.checkpoint_steps = [t for t in self.checkpoint_steps if t < common]

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceReader({self.name}, steps={self.num_steps}, finished={self.finished})"

    # -- records --------------------------------------------------------------------------

    def _check_index(self, t: int) -> None:
        if not 0 <= t < self.num_steps:
            raise IndexError(
                f"step {t} is outside the trace's committed steps 0..{self.num_steps - 1}"
            )

    def _raw_step(self, t: int) -> dict[str, Any]:
        self._check_index(t)
        return check_step(self._get(step_key(t)), t, self._where(step_key(t)))

    def _raw_forwards(self) -> Iterator[dict[str, Any]]:
        for t in range(self.num_steps):
            yield from self._raw_step(t)["forwards"]

    def _forwards(self, raw: dict[str, Any]) -> list[ForwardRecord]:
        where = self._where(step_key(raw.get("index", -1)))
        return decode_forwards(raw, self.samples.rows, where=where, **self._decoding())

    def _decoding(self) -> dict[str, Any]:
        """What decoding a forward needs besides its record: rank, bounds, RNG bases."""
        return {"rank": self.meta.rank, "bounds": self.bounds, "rng_of": self.rng_bases}

    def step_update(
        self, t: int
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, str]]]:
        """Only what the optimizer needs for step ``t``: grads, groups, tensor-typed keys."""
        return decode_update(self._raw_step(t), self.bounds, self._where(step_key(t)))

    def step(self, t: int) -> StepRecord:
        """The full record of optimizer step ``t`` (a DDP trace: every rank's forwards)."""
        raw = self._raw_step(t)
        forwards = self._forwards(raw)
        for rr in self._ranks:
            forwards += rr._forwards(rr._raw_step(t))
        return decode_step(raw, self.group_of, forwards, self._where(step_key(t)), self.bounds)

    def steps(
        self, start: int = 0, stop: int | None = None, reverse: bool = False
    ) -> Iterator[StepRecord]:
        """Step records for ``range(start, stop)``, optionally newest first."""
        stop = self.num_steps if stop is None else min(stop, self.num_steps)
        order = range(start, stop)
        for t in reversed(order) if reverse else order:
            yield self.step(t)

    def skips(self) -> list[SkipRecord]:
        """Iterations whose gradients were discarded without a step (e.g. AMP overflow)."""
        out = [self.skip(n) for n in range(int(self.progress.get("skipped", 0)))]
        # DDP: the ranks skip together (their gradients are the same all-reduced ones)
        for rr in self._ranks:
            for rs in rr.skips():
                if rs.index < len(out) and rs.before_step == out[rs.index].before_step:
                    out[rs.index].forwards.extend(rs.forwards)
        return out

    def skip(self, n: int) -> SkipRecord:
        """The ``n``-th skip record of this store (``skips()`` merges a DDP trace's ranks)."""
        raw = self._get(skip_key(n))
        where = self._where(skip_key(n))
        return decode_skip(raw, n, self.samples.rows, where=where, **self._decoding())

    def sample(self, sample_id: str) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The stored input row(s) of one sample: a tensor, or a tuple with one per batched input.

        ``sample_id`` is a ``ForwardRecord.ids`` entry (a content id, or a user id given
        with ``set_sample_ids``). Raises ``KeyError`` for an unknown id.
        """
        # DDP: each rank's samples live in its own store; rank 0's first
        for rr in (self, *self._ranks):
            cid = rr.samples.content_id(sample_id)
            if cid is not None:
                rows = [r.clone() for r in rr.samples.rows(cid)]
                return rows[0] if len(rows) == 1 else tuple(rows)
        raise KeyError(f"no sample with id {sample_id!r} in {self.name}")

    def checkpoint(self, t: int) -> Checkpoint:
        """The stored state before step ``t`` (``t == num_steps`` gives the final state)."""
        if t == self.num_steps:
            final = self.final()
            if final is not None:
                return final
        if t not in self.checkpoint_steps:
            raise KeyError(f"no checkpoint at step {t}; checkpoints: {self.checkpoint_steps}")
        key = ckpt_key(t)
        return decode_state(self._get(key), self._where(key), self.bounds)

    def final(self) -> Checkpoint | None:
        """θ_T, buffers and optimizer state at the end; None for an interrupted run."""
        if not self.progress.get("final", False):
            return None
        return decode_state(self._get(FINAL), self._where(FINAL), self.bounds)

    def segments(self) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges between consecutive checkpoints, covering ``0..T``."""
        bounds = sorted(set(self.checkpoint_steps) | {self.num_steps})
        if self.num_steps == 0:
            return []
        return list(zip(bounds[:-1], bounds[1:]))

    # -- replay ---------------------------------------------------------------------------

    @property
    def gradients(self) -> str:
        """How the run's gradients were recorded: "stored", "recompute" or "auto"."""
        return self.meta.options.gradients

    @property
    def gradients_stored_from(self) -> int | None:
        """gradients="auto": the first step whose gradient is stored (None: none is)."""
        v = self.progress.get("gradients_stored_from")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def needs_model(self) -> bool:
        """Whether replay recomputes gradients, so ``replay``/``params_at`` need ``model=``."""
        if self.gradients == "stored" or self.num_steps == 0:
            return False
        return self.gradients_stored_from != 0

    def _recompute(self, model: torch.nn.Module | None) -> GradientRecompute | None:
        if model is None or self.gradients == "stored":
            return None
        self.check_model(model)  # names what differs (class, shapes, dtypes) before any step
        return GradientRecompute(model, output_module=self.meta.output_module, where=self.name)

    def replay(
        self,
        start: int = 0,
        stop: int | None = None,
        *,
        with_state: bool = True,
        model: torch.nn.Module | None = None,
    ) -> Iterator[ReplayStep]:
        """Rebuild θ_t for ``t`` in ``range(start, stop)`` by replaying the recorded optimizer.

        A trace recorded with ``gradients="recompute"`` (or ``"auto"``) needs ``model`` (the
        traced architecture, on the device the run trained on) to recompute each gradient;
        each is checked against its fingerprint (``GradientMismatchError``)."""
        stop = self.num_steps if stop is None else stop
        if not 0 <= start <= stop <= self.num_steps:
            raise IndexError(
                f"replay range [{start}, {stop}) is outside the trace's steps 0..{self.num_steps}"
            )
        return replay_steps(
            self, start, stop, with_state=with_state, recompute=self._recompute(model)
        )

    def params_at(self, t: int, *, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """θ_t: stored when ``t`` is a checkpoint (or the end), else rebuilt by replay
        (``model``: see ``replay``)."""
        if not 0 <= t <= self.num_steps:
            raise IndexError(f"step {t} is outside 0..{self.num_steps}")
        if t in self.checkpoint_steps or (t == self.num_steps and self.progress.get("final")):
            return self.checkpoint(t).params
        recompute = self._recompute(model)
        for rs in replay_steps(self, t - 1, t, with_state=False, recompute=recompute):
            return rs.next_params
        raise TraceCorruptError(f"{self.name}: cannot rebuild the parameters at step {t}")

    def buffers_at(self, t: int) -> dict[str, torch.Tensor]:
        """Buffers b_t: after step ``t``'s forwards (``t == num_steps``: at the end).

        The buffers of a step are those of the last step at or before it that stored them,
        or of the checkpoint that opens its segment. The buffers of every step of one
        segment are read in one pass (each step record and the checkpoint's buffers decoded
        once) and kept for the segment asked for last and its nearest neighbour.
        """
        if t == self.num_steps and self.progress.get("final"):
            return dict(self.final().buffers)  # type: ignore[union-attr]  # freshly decoded
        self._check_index(t)
        start = max((c for c in self.checkpoint_steps if c <= t), default=0)
        segments = self._buffer_segments
        seg = segments.get(start)
        if seg is None or len(seg) <= t - start:
            seg = segments[start] = self._segment_buffers(start, t)
            while len(segments) > 2:  # keep the neighbour: drop the farthest segment
                del segments[max(segments, key=lambda s: abs(s - start))]
        return {k: v.clone() for k, v in seg[t - start].items()}

    def _segment_buffers(self, start: int, upto: int) -> list[dict[str, torch.Tensor]]:
        """The buffers at steps ``start..end`` of the segment that opens at ``start``."""
        stop = next((c for c in self.checkpoint_steps if c > start), self.num_steps)
        stop = max(stop, upto + 1)
        out: list[dict[str, torch.Tensor]] = []
        current: dict[str, torch.Tensor] | None = None
        for s in range(start, stop):
            raw = self._raw_step(s)
            if raw.get("buffers") is not None:
                current = self.bounds.buffer_map(raw["buffers"], self._where(step_key(s)))
            elif current is None:
                current = self._checkpoint_buffers(s) if s in self.checkpoint_steps else {}
            out.append(current)
        return out

    def _checkpoint_buffers(self, t: int) -> dict[str, torch.Tensor]:
        raw = self._get(ckpt_key(t))
        if not isinstance(raw, dict):
            raise TraceCorruptError(f"{self._where(ckpt_key(t))} is malformed (not a map)")
        return self.bounds.buffer_map(raw.get("buffers"), self._where(ckpt_key(t)))

    def check_drift(self, *, model: torch.nn.Module | None = None) -> DriftReport:
        """Replay the whole trace and compare with every stored checkpoint and the end
        (``model``: see ``replay``; a trace that needs one raises ``ModelRequiredError``)."""
        if self._drift is None:
            report = DriftReport(lossy=self.lossy)
            recompute = self._recompute(model)
            for _ in replay_steps(
                self, 0, self.num_steps, with_state=False, report=report, recompute=recompute
            ):
                pass
            self._drift = report
        return self._drift

    def check_model(self, model: torch.nn.Module, *, model_class: bool = True) -> None:
        """Raise ``TraceMismatchError`` naming every parameter/buffer that differs from the trace.

        ``model`` must be an ``nn.Module`` of the recorded class or a subclass of it, by
        name (the module may differ: a training script's ``__main__.Net`` is the analysis
        script's ``models.Net``); ``model_class=False`` skips the class check.
        """
        if not isinstance(model, torch.nn.Module):
            raise TraceMismatchError(
                f"the model given for the trace {self.name} is a {type(model).__name__}, not a "
                f"torch.nn.Module; pass a model of the recorded class ({self.meta.model_class})."
            )
        problems: list[str] = []
        recorded = self.meta.model_class.rsplit(".", 1)[-1]
        if model_class and recorded and recorded not in {c.__name__ for c in type(model).__mro__}:
            problems.append(
                f"the model is a {qualified_name(type(model))}, the trace was recorded from a "
                f"{self.meta.model_class} (pass model_class=False to compare shapes only)"
            )
        live = {n: p for n, p in model.named_parameters() if p.requires_grad}
        _compare("parameter", {p.name: p for p in self.meta.params}, live, problems)
        bufs = {n: b for n, b in model.named_buffers() if b is not None}
        _compare("buffer", {b.name: b for b in self.meta.buffers}, bufs, problems)
        if problems:
            raise TraceMismatchError(
                f"the model does not match the trace {self.name}:\n  - "
                + "\n  - ".join(problems)
                + "\nUse the same architecture (and the same frozen/trainable split) as in training."
            )


def _check_progress(raw: Any, where: str) -> dict[str, Any]:
    """The progress record, if its fields have their types."""
    ok = isinstance(raw, dict)
    if ok:
        for key in ("steps", "skipped", "stored_bytes", "raw_bytes"):
            v = raw.get(key, 0)
            ok = ok and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62
        for key in ("finished", "final"):
            ok = ok and isinstance(raw.get(key, False), bool)
        ok = ok and isinstance(raw.get("error"), str | type(None))
        kinds = raw.get("kind_bytes", {})
        ok = (
            ok
            and isinstance(kinds, dict)
            and all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in kinds.items()
            )
        )
        ok = ok and isinstance(raw.get("gradients_switch_reason"), str | type(None))
        v = raw.get("gradients_stored_from", 0)
        ok = ok and isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not ok:
        raise TraceCorruptError(
            f"{where}: record 'progress' is malformed (its step counts are not counts); "
            "restore the trace from a copy."
        )
    return raw


def _compare(
    kind: str, traced: dict[str, Any], live: dict[str, torch.Tensor], problems: list[str]
) -> None:
    for name in traced.keys() - live.keys():
        problems.append(f"{kind} {name!r} is in the trace but not (or not trainable) in the model")
    for name in live.keys() - traced.keys():
        problems.append(f"{kind} {name!r} is in the model but not in the trace")
    for name in traced.keys() & live.keys():
        info, t = traced[name], live[name]
        if tuple(t.shape) != tuple(info.shape):
            problems.append(
                f"{kind} {name!r} has shape {tuple(t.shape)}, the trace has {tuple(info.shape)}"
            )
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != info.dtype:
            problems.append(f"{kind} {name!r} has dtype {dtype}, the trace has {info.dtype}")


def open_trace(spec: Store | str | os.PathLike[str]) -> TraceReader:
    """Open a trace read-only: a path, a ``scheme://`` URL or a ``Store`` instance.

    A DDP trace (rank 0's store) opens with the other ranks' stores merged in (``ddp.py``).
    """
    store = open_store(spec, readonly=True)
    name = str(spec) if not isinstance(spec, Store) else repr(spec)
    try:
        reader = TraceReader(store, name=name)
    except BaseException:
        store.close()
        raise
    if reader.meta.world_size == 1:
        return reader
    try:
        ranks = open_rank_stores(reader, spec, lambda s, where: TraceReader(s, name=where))
        try:
            reader._attach_ranks(ranks)
        except BaseException:
            for rr in ranks:
                rr.close()
            raise
    except BaseException:
        reader.close()
        raise
    return reader
