"""Read a trace: metadata, steps, checkpoints, samples; rebuild θ_t by optimizer replay."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import msgpack
import torch

from . import codec
from .ddp import base_store_spec, check_rank_steps, rank_store_spec
from .errors import (
    DistributedTraceError,
    NotATraceError,
    StoreError,
    TraceCorruptError,
    TraceMismatchError,
)
from .records import (
    Checkpoint,
    ForwardRecord,
    SkipRecord,
    StepRecord,
    TraceMeta,
    build_tree,
    decode_checkpoint,
    decode_tensors,
)
from .replay import DriftReport, ReplayStep, replay_steps
from .schema import FINAL, META, PROGRESS, ckpt_key, sample_key, skip_key, step_key
from .stores import Store, open_store

__all__ = ["TraceReader", "open_trace"]

logger = logging.getLogger(__name__)

_SAMPLE_CACHE_BYTES = 256 << 20


class _SampleCache:
    """LRU of decoded sample rows, bounded by bytes."""

    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.limit = limit
        self.size = 0
        self.items: OrderedDict[str, list[torch.Tensor]] = OrderedDict()

    def get(self, key: str) -> list[torch.Tensor] | None:
        with self.lock:
            rows = self.items.get(key)
            if rows is not None:
                self.items.move_to_end(key)
            return rows

    def put(self, key: str, rows: list[torch.Tensor]) -> None:
        n = sum(r.numel() * r.element_size() for r in rows)
        with self.lock:
            if key in self.items:
                return
            self.items[key] = rows
            self.size += n
            while self.size > self.limit and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.size -= sum(r.numel() * r.element_size() for r in old)


class TraceReader:
    """Read-only access to a recorded trace (see docs/architecture.md §3)."""

    def __init__(self, store: Store, *, name: str = "") -> None:
        self.store = store
        self.name = name or repr(store)
        raw = store.get(META)
        if raw is None:
            raise NotATraceError(f"{self.name} holds no trace (no meta record).")
        self.meta = TraceMeta.decode(codec.unpack(raw), self.name)
        prog = store.get(PROGRESS)
        if prog is None and next(iter(store.keys("step/")), None) is not None:
            raise TraceCorruptError(
                f"{self.name}: record 'progress' is missing but step records are present, so "
                "which steps were committed is unknown. Restore the trace from a copy."
            )
        self.progress: dict[str, Any] = codec.unpack(prog) if prog is not None else {"steps": 0}
        self.num_steps = int(self.progress.get("steps", 0))
        self.finished = bool(self.progress.get("finished", False))
        self.error: str | None = self.progress.get("error")
        self.lossy = self.meta.lossy
        self.param_names = [p.name for p in self.meta.params]
        self.buffer_names = [b.name for b in self.meta.buffers]
        self.group_of = {n: gi for gi, g in enumerate(self.meta.optimizer.groups) for n in g.params}
        self.checkpoint_steps = sorted(
            t for t in (int(k.split("/", 1)[1]) for k in store.keys("ckpt/")) if t < self.num_steps
        )
        self._samples = _SampleCache(_SAMPLE_CACHE_BYTES)
        self._drift: DriftReport | None = None
        self._user_ids: dict[str, str] | None = None
        self._ranks: list[TraceReader] = []  # DDP: readers of ranks 1..world_size-1
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

    def _get(self, key: str) -> Any:
        raw = self.store.get(key)
        if raw is None:
            raise TraceCorruptError(f"{self.name}: record {key!r} is missing")
        return codec.unpack(raw)

    def close(self) -> None:
        """Close the underlying store (and the other ranks' stores of a DDP trace)."""
        try:
            for rr in self._ranks:
                rr.store.close()
        finally:
            self.store.close()

    # -- DDP ------------------------------------------------------------------------------

    def _attach_ranks(self, ranks: list[TraceReader]) -> None:
        """Merge the stores of ranks 1.. of a DDP trace (checked against this, rank 0's)."""
        mine = self.meta
        for r, rr in enumerate(ranks, start=1):
            theirs = rr.meta
            if theirs.schema_version != mine.schema_version:
                raise DistributedTraceError(
                    f"{self.name}: rank {r}'s store {rr.name} has trace schema version "
                    f"{theirs.schema_version} but rank 0's has {mine.schema_version}; the ranks "
                    "of one run are written by the same explaind. Record again."
                )
            if (theirs.rank, theirs.world_size) != (r, mine.world_size):
                raise DistributedTraceError(
                    f"{self.name}: the store {rr.name} expected for rank {r} of "
                    f"{mine.world_size} says it is rank {theirs.rank} of {theirs.world_size}; "
                    "it belongs to another run. Record again, or restore the right store."
                )
            if theirs.params != mine.params:
                raise DistributedTraceError(
                    f"{self.name}: rank {r}'s store {rr.name} records different parameters "
                    "(names, shapes or dtypes) than rank 0's; it belongs to another run."
                )
        steps = [self.num_steps, *(rr.num_steps for rr in ranks)]
        common = check_rank_steps(self.name, steps)
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
        raw = self._get(step_key(t))
        if not isinstance(raw, dict) or raw.get("index") != t:
            raise TraceCorruptError(f"{self.name}: step record {t} is malformed")
        return raw

    def step_update(
        self, t: int
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, str]]]:
        """Only what the optimizer needs for step ``t``: grads, groups, tensor-typed keys."""
        raw = self._raw_step(t)
        return decode_tensors(raw["grads"]), raw["groups"], raw.get("tensor_hyperparams") or []

    def step(self, t: int) -> StepRecord:
        """The full record of optimizer step ``t``."""
        raw = self._raw_step(t)
        try:
            return StepRecord(
                index=t,
                grads=decode_tensors(raw["grads"]),
                groups=raw["groups"],
                group_of=dict(self.group_of),
                forwards=[self._forward(f) for f in raw["forwards"]]
                + [f for rr in self._ranks for f in rr._rank_forwards(t)],
                buffers=None if raw.get("buffers") is None else decode_tensors(raw["buffers"]),
                tensor_hyperparams=raw.get("tensor_hyperparams") or [],
            )
        except (KeyError, TypeError) as e:
            raise TraceCorruptError(f"{self.name}: step record {t} is malformed ({e!r})") from e

    def _rank_forwards(self, t: int) -> list[ForwardRecord]:
        """This rank's forwards of step ``t`` (a DDP rank store)."""
        try:
            return [self._forward(f) for f in self._raw_step(t)["forwards"]]
        except (KeyError, TypeError) as e:
            raise TraceCorruptError(f"{self.name}: step record {t} is malformed ({e!r})") from e

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
        out = []
        for n in range(int(self.progress.get("skipped", 0))):
            raw = self._get(skip_key(n))
            out.append(
                SkipRecord(
                    index=n,
                    before_step=int(raw["before_step"]),
                    reason=str(raw.get("reason", "")),
                    forwards=[self._forward(f) for f in raw["forwards"]],
                )
            )
        # DDP: the ranks skip together (their gradients are the same all-reduced ones)
        for rr in self._ranks:
            for rs in rr.skips():
                if rs.index < len(out) and rs.before_step == out[rs.index].before_step:
                    out[rs.index].forwards.extend(rs.forwards)
        return out

    def _sample_rows(self, cid: str) -> list[torch.Tensor]:
        rows = self._samples.get(cid)
        if rows is None:
            raw = self._get(sample_key(cid))
            rows = [codec.decode_tensor(r) for r in raw["rows"]]
            self._samples.put(cid, rows)
        return rows

    def sample(self, sample_id: str) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The stored input row(s) of one sample: a tensor, or a tuple with one per batched input.

        ``sample_id`` is a ``ForwardRecord.ids`` entry (a content id, or a user id given
        with ``set_sample_ids``). Raises ``KeyError`` for an unknown id.
        """
        # DDP: each rank's samples live in its own store; rank 0's first
        for rr in (self, *self._ranks):
            cid = sample_id
            if rr.store.get(sample_key(cid)) is None:
                cid = rr._user_id_index().get(sample_id)
                if cid is None:
                    continue
            rows = [r.clone() for r in rr._sample_rows(cid)]
            return rows[0] if len(rows) == 1 else tuple(rows)
        raise KeyError(f"no sample with id {sample_id!r} in {self.name}")

    def _user_id_index(self) -> dict[str, str]:
        if self._user_ids is None:
            self._user_ids = self._index_user_ids()
        return self._user_ids

    def _index_user_ids(self) -> dict[str, str]:
        """user id -> content id of its first recorded row (one scan of the step records)."""
        index: dict[str, str] = {}
        for t in range(self.num_steps):
            for f in self._raw_step(t)["forwards"]:
                if f.get("ids") is not None:
                    for uid, cid in zip(f["ids"], f["rows"]):
                        index.setdefault(uid, cid)
        return index

    def _forward(self, f: dict[str, Any]) -> ForwardRecord:
        b = int(f["batch_size"])
        cids = list(f["rows"])
        if len(cids) != b:
            raise TraceCorruptError(
                f"{self.name}: a forward lists {len(cids)} rows for batch size {b}"
            )
        samples = [self._sample_rows(c) for c in cids]
        slots = []
        for k, spec in enumerate(f["slots"]):
            rows = [s[k] for s in samples]
            if any(
                list(r.shape) != spec["shape"] or codec.dtype_name(r.dtype) != spec["dtype"]
                for r in rows
            ):
                raise TraceCorruptError(
                    f"{self.name}: a stored sample does not match its input slot {k}"
                )
            if not rows:  # an empty batch: no stored samples to stack
                dtype = codec.DTYPES.get(spec["dtype"])
                if dtype is None:
                    raise TraceCorruptError(f"{self.name}: input slot {k} has an unknown dtype")
                slots.append(torch.empty((0, *spec["shape"]), dtype=dtype))
                continue
            slots.append(torch.stack(rows))
        consts = [codec.decode_tensor(t) for t in f["tensors"]]
        cots = [None if c is None else codec.decode_tensor(c) for c in f["cotangents"]]
        args = build_tree(f["args"], slots, consts)
        kwargs = build_tree(f["kwargs"], slots, consts)
        return ForwardRecord(
            args=tuple(args),
            kwargs=dict(kwargs),
            cotangent=build_tree(f["output"], [], cots),
            ids=list(f["ids"]) if f.get("ids") is not None else cids,
            rng_state=codec.decode_tensor(f["rng_state"]),
            cuda_rng_state=None
            if f.get("cuda_rng_state") is None
            else codec.decode_tensor(f["cuda_rng_state"]),
            training=bool(f["training"]),
            mode_overrides=dict(f.get("mode_overrides") or {}),
            buffers=None if f.get("buffers") is None else decode_tensors(f["buffers"]),
            grad_scale=float(f.get("grad_scale", 1.0)),
            batch_size=b,
            content_ids=cids,
            rank=self.meta.rank,
        )

    def checkpoint(self, t: int) -> Checkpoint:
        """The stored state before step ``t`` (``t == num_steps`` gives the final state)."""
        if t == self.num_steps:
            final = self.final()
            if final is not None:
                return final
        if t not in self.checkpoint_steps:
            raise KeyError(f"no checkpoint at step {t}; checkpoints: {self.checkpoint_steps}")
        return decode_checkpoint(self._get(ckpt_key(t)))

    def final(self) -> Checkpoint | None:
        """θ_T, buffers and optimizer state at the end; None for an interrupted run."""
        if not self.progress.get("final", False):
            return None
        return decode_checkpoint(self._get(FINAL))

    def segments(self) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges between consecutive checkpoints, covering ``0..T``."""
        bounds = sorted(set(self.checkpoint_steps) | {self.num_steps})
        if self.num_steps == 0:
            return []
        return list(zip(bounds[:-1], bounds[1:]))

    # -- replay ---------------------------------------------------------------------------

    def replay(
        self, start: int = 0, stop: int | None = None, *, with_state: bool = True
    ) -> Iterator[ReplayStep]:
        """Rebuild θ_t for ``t`` in ``range(start, stop)`` by replaying the recorded optimizer."""
        stop = self.num_steps if stop is None else stop
        if not 0 <= start <= stop <= self.num_steps:
            raise IndexError(
                f"replay range [{start}, {stop}) is outside the trace's steps 0..{self.num_steps}"
            )
        return replay_steps(self, start, stop, with_state=with_state)

    def params_at(self, t: int) -> dict[str, torch.Tensor]:
        """θ_t: stored when ``t`` is a checkpoint (or the end), else rebuilt by replay."""
        if not 0 <= t <= self.num_steps:
            raise IndexError(f"step {t} is outside 0..{self.num_steps}")
        if t in self.checkpoint_steps or (t == self.num_steps and self.progress.get("final")):
            return self.checkpoint(t).params
        for rs in replay_steps(self, t - 1, t, with_state=False):
            return rs.next_params
        raise TraceCorruptError(f"{self.name}: cannot rebuild the parameters at step {t}")

    def buffers_at(self, t: int) -> dict[str, torch.Tensor]:
        """Buffers b_t: after step ``t``'s forwards (``t == num_steps``: at the end)."""
        if t == self.num_steps and self.progress.get("final"):
            return self.checkpoint(t).buffers
        self._check_index(t)
        for s in range(t, -1, -1):
            raw = self._raw_step(s)
            if raw.get("buffers") is not None:
                return decode_tensors(raw["buffers"])
            if s in self.checkpoint_steps:
                return self.checkpoint(s).buffers
        return {}

    def check_drift(self) -> DriftReport:
        """Replay the whole trace and compare with every stored checkpoint and the end."""
        if self._drift is None:
            report = DriftReport(lossy=self.lossy)
            for _ in replay_steps(self, 0, self.num_steps, with_state=False, report=report):
                pass
            self._drift = report
        return self._drift

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``TraceMismatchError`` naming every parameter/buffer that differs from the trace."""
        problems: list[str] = []
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
    """Open a trace read-only: a path, a ``scheme://`` URL or a ``Store`` instance."""
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
        _open_ranks(reader, spec)
    except BaseException:
        reader.close()
        raise
    return reader


def _open_ranks(reader: TraceReader, spec: Any) -> None:
    """Open and attach the other ranks' stores of the DDP trace whose rank-0 reader is given."""
    meta = reader.meta
    if meta.rank != 0:
        raise DistributedTraceError(
            f"{reader.name} holds only rank {meta.rank}'s forwards of a {meta.world_size}-rank "
            f"DDP trace; open rank 0's trace at {base_store_spec(spec)!r} instead."
        )
    if isinstance(spec, Store):
        raise DistributedTraceError(
            f"{reader.name} is rank 0's store of a {meta.world_size}-rank DDP trace; open it by "
            "its path or URL so that the other ranks' stores ('<path>.rank{r}') can be found."
        )
    ranks: list[TraceReader] = []
    try:
        for r in range(1, meta.world_size):
            where = rank_store_spec(spec, r)
            try:
                store = open_store(where, readonly=True)
            except StoreError as e:
                raise DistributedTraceError(
                    f"{reader.name}: the store of rank {r} of {meta.world_size} ({where!r}) "
                    f"cannot be opened ({e}). A DDP trace needs every rank's store next to rank "
                    "0's; copy them together."
                ) from e
            try:
                ranks.append(TraceReader(store, name=where))
            except StoreError as e:
                store.close()
                raise DistributedTraceError(
                    f"{reader.name}: the store of rank {r} ({where!r}) is not readable: {e}"
                ) from e
        reader._attach_ranks(ranks)
    except BaseException:
        for rr in ranks:
            rr.close()
        raise
