"""The per-step records, encoded and decoded side by side.

``step/{t:08d}`` (one optimizer step)::

    {"index": t,
     "grads": {param name: tensor},        # params without a gradient are absent
     "groups": [{hyperparameter: value}],  # per param group, as used by this step
     "tensor_hyperparams": [{key: dtype}], # which hyperparameters were tensors
     "forwards": [forward],                # the forwards whose gradients this step used
     "buffers": {name: tensor} | None}     # after the forwards; None: unchanged

a forward::

    {"batch_size": B, "rows": [content id] * B, "ids": [user id] * B | None,
     "slots": [{"dtype", "shape"}],        # batched inputs (row shape), rows in sample/*
     "args": tree, "kwargs": tree,         # see trees.py
     "tensors": [tensor],                  # constant (non-batched) inputs
     "output": tree, "cotangents": [tensor | None],
     "rng_state": tensor, "cuda_rng_state": tensor | None,
     "training": bool, "mode_overrides": {module: bool},
     "buffers": {name: tensor} | None, "grad_scale": float}

``sample/{content id}``: ``{"rows": [tensor]}``, one row per batched input slot; each
distinct sample is stored once. ``skip/{n:08d}``: ``{"index", "before_step", "reason",
"forwards"}`` for forwards whose gradients were discarded without a step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import codec
from .encoder import TensorEncoder
from .errors import TraceCorruptError
from .records import CapturedForward, CapturedStep, ForwardRecord, SkipRecord, StepRecord
from .schema import sample_key, skip_key, step_key
from .state import decode_tensors, encode_checkpoint
from .trees import build_tree

__all__ = [
    "encode_step",
    "encode_skip",
    "check_step",
    "decode_update",
    "decode_step",
    "decode_forward",
    "decode_forwards",
    "decode_skip",
    "decode_sample",
]

Rows = Callable[[str], list[torch.Tensor]]  # content id -> the stored rows of that sample


# -- encode --------------------------------------------------------------------------------


def _encode_samples(
    enc: TensorEncoder, f: CapturedForward, out: list[tuple[str, Any]]
) -> list[str]:
    """Content ids of the rows of ``f``; appends the samples not stored yet to ``out``."""
    b = f.batch_size
    views = []
    for t in f.slots:
        u8 = codec.tensor_u8(t)  # a view of the captured copy, not another copy
        row_bytes = int(np.prod(t.shape[1:], dtype=np.int64)) * t.element_size()
        views.append((codec.dtype_name(t.dtype), list(t.shape[1:]), u8.reshape(b, row_bytes)))
        enc.raw_bytes += t.numel() * t.element_size()
    # one keyed blake2b per row: the key covers every slot's dtype and row shape, the
    # message is the row's bytes from all slots side by side
    header = repr([(d, s) for d, s, _ in views]).encode()
    key = hashlib.blake2b(header, digest_size=32).digest()
    joined = views[0][2] if len(views) == 1 else np.concatenate([v for _, _, v in views], axis=1)
    ids = enc.row_ids.ids(key, joined, enc.pace)
    known = enc.known_samples
    for i, cid in enumerate(ids):
        if cid in known:
            continue
        known.add(cid)
        rows = [
            codec.encode_bytes(rows[i], dtype, shape, level=enc.level)
            for dtype, shape, rows in views
        ]
        out.append((sample_key(cid), {"rows": rows}))
        enc.pace()
    return ids


def _encode_forward(
    enc: TensorEncoder, f: CapturedForward, out: list[tuple[str, Any]]
) -> dict[str, Any]:
    rows = _encode_samples(enc, f, out)
    return {
        "batch_size": f.batch_size,
        "rows": rows,
        "ids": f.user_ids,
        "slots": [
            {"dtype": codec.dtype_name(t.dtype), "shape": list(t.shape[1:])} for t in f.slots
        ],
        "args": f.args,
        "kwargs": f.kwargs,
        "tensors": [enc.tensor(t) for t in f.tensors],
        "output": f.output,
        "cotangents": [None if c is None else enc.tensor(c) for c in f.cotangents],
        "rng_state": enc.repeated("rng_state", f.rng_state),
        "cuda_rng_state": (
            None if f.cuda_rng_state is None else enc.repeated("cuda_rng_state", f.cuda_rng_state)
        ),
        "training": f.training,
        "mode_overrides": f.mode_overrides,
        "buffers": None if f.buffers is None else enc.buffers(f.buffers),
        "grad_scale": f.grad_scale,
    }


def encode_step(enc: TensorEncoder, s: CapturedStep) -> list[tuple[str, bytes]]:
    """The stored records of one step: new samples, the step, and its checkpoint if any."""
    out: list[tuple[str, Any]] = []
    enc.raw_bytes += sum(4 * g.numel() for g in s.grads.values())
    rec = {
        "index": s.index,
        "grads": enc.tensors(s.grads, lossy=True),
        "groups": s.groups,
        "tensor_hyperparams": s.tensor_hyperparams,
        "forwards": [_encode_forward(enc, f, out) for f in s.forwards],
        "buffers": None if s.buffers is None else enc.buffers(s.buffers),
    }
    enc.pace()
    out.append((step_key(s.index), rec))
    if s.checkpoint is not None:
        out.append(encode_checkpoint(enc, s.checkpoint))
    return enc.pack(out)


def encode_skip(
    enc: TensorEncoder, n: int, before_step: int, reason: str, forwards: list[CapturedForward]
) -> list[tuple[str, bytes]]:
    """The stored records of the ``n``-th discarded step: new samples and the skip record."""
    out: list[tuple[str, Any]] = []
    rec = {
        "index": n,
        "before_step": before_step,
        "reason": reason,
        "forwards": [_encode_forward(enc, f, out) for f in forwards],
    }
    out.append((skip_key(n), rec))
    return enc.pack(out)


# -- decode --------------------------------------------------------------------------------


def check_step(raw: Any, t: int, where: str) -> dict[str, Any]:
    """``raw`` if it is the step record of step ``t``."""
    if not isinstance(raw, dict) or raw.get("index") != t:
        raise TraceCorruptError(f"{where}: step record {t} is malformed")
    return raw


def decode_update(
    raw: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, str]]]:
    """Only what the optimizer needs from a step record: grads, groups, tensor-typed keys."""
    return decode_tensors(raw["grads"]), raw["groups"], raw.get("tensor_hyperparams") or []


def decode_step(
    raw: dict[str, Any],
    group_of: dict[str, int],
    forwards: list[ForwardRecord],
    where: str,
) -> StepRecord:
    """A step record, given its forwards (decoded with ``decode_forward``)."""
    t = raw["index"]
    try:
        return StepRecord(
            index=t,
            grads=decode_tensors(raw["grads"]),
            groups=raw["groups"],
            group_of=dict(group_of),
            forwards=forwards,
            buffers=None if raw.get("buffers") is None else decode_tensors(raw["buffers"]),
            tensor_hyperparams=raw.get("tensor_hyperparams") or [],
        )
    except (KeyError, TypeError) as e:
        raise TraceCorruptError(f"{where}: step record {t} is malformed ({e!r})") from e


def decode_forward(f: dict[str, Any], rows_of: Rows, *, rank: int, where: str) -> ForwardRecord:
    """A forward, its batched inputs rebuilt from the stored sample rows."""
    b = int(f["batch_size"])
    cids = list(f["rows"])
    if len(cids) != b:
        raise TraceCorruptError(f"{where}: a forward lists {len(cids)} rows for batch size {b}")
    samples = [rows_of(c) for c in cids]
    slots = []
    for k, spec in enumerate(f["slots"]):
        rows = [s[k] for s in samples]
        if any(
            list(r.shape) != spec["shape"] or codec.dtype_name(r.dtype) != spec["dtype"]
            for r in rows
        ):
            raise TraceCorruptError(f"{where}: a stored sample does not match its input slot {k}")
        if not rows:  # an empty batch: no stored samples to stack
            dtype = codec.DTYPES.get(spec["dtype"])
            if dtype is None:
                raise TraceCorruptError(f"{where}: input slot {k} has an unknown dtype")
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
        rank=rank,
    )


def decode_forwards(raw: dict[str, Any], rows_of: Rows, *, rank: int, where: str):
    """The forwards of a step or skip record."""
    t = raw.get("index")
    try:
        return [decode_forward(f, rows_of, rank=rank, where=where) for f in raw["forwards"]]
    except (KeyError, TypeError) as e:
        raise TraceCorruptError(f"{where}: step record {t} is malformed ({e!r})") from e


def decode_skip(raw: Any, n: int, rows_of: Rows, *, rank: int, where: str) -> SkipRecord:
    """The ``n``-th skip record."""
    try:
        return SkipRecord(
            index=n,
            before_step=int(raw["before_step"]),
            reason=str(raw.get("reason", "")),
            forwards=[decode_forward(f, rows_of, rank=rank, where=where) for f in raw["forwards"]],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TraceCorruptError(f"{where}: skip record {n} is malformed ({e!r})") from e


def decode_sample(raw: Any, where: str) -> list[torch.Tensor]:
    """The stored rows of one sample (one per batched input slot)."""
    try:
        return [codec.decode_tensor(r) for r in raw["rows"]]
    except (KeyError, TypeError) as e:
        raise TraceCorruptError(f"{where}: a sample record is malformed ({e!r})") from e
