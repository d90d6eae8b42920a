"""The per-step records, encoded and decoded side by side.

``step/{t:08d}`` (one optimizer step)::

    {"index": t,
     "grads": {param name: tensor},        # params without a gradient are absent; or packed
                                           # {"packed": 1, "of": [header position], "data":
                                           # tensor} (encoder.TensorEncoder.gradients)
     "group_changes": [{hyperparameter: value}],  # per param group, those whose value
                                           # differs from the header's (else "groups":
                                           # [{hyperparameter: value}] whole, as used)
     "tensor_hyperparams": [{key: dtype}], # which hyperparameters were tensors
     "forwards": [forward],                # the forwards whose gradients this step used
     "buffers": {name: tensor} | None,     # after the forwards; None: unchanged
     "fingerprints": {param name: {"bits", "norm", "at"}}}  # only when grads are not
                                           # stored (gradients="recompute"; fingerprint.py)

a forward::

    {"batch_size": B, "rows": bytes,         # the B content ids' 16-byte digests side by side
     "ids": [user id] * B | None,
     "slots": [{"dtype", "shape"}],        # batched inputs (row shape), rows in sample/*
     "args": tree, "kwargs": tree,         # see trees.py
     "tensors": [tensor],                  # constant (non-batched) inputs
     "output": tree, "cotangents": [tensor | codec map | None],  # cotangent_codec.py
     "rng_state": tensor, "cuda_rng_state": tensor | None,
     "training": bool, "mode_overrides": {module: bool},
     "buffers": {name: tensor} | None, "grad_scale": float,
     "autocast": {device type: dtype name}}  # only when the forward ran under autocast

``sample/{content id}``: ``{"rows": [tensor]}``, one row per batched input slot; each
distinct sample is stored once. ``skip/{n:08d}``: ``{"index", "before_step", "reason",
"forwards"}`` for forwards whose gradients were discarded without a step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import torch

from . import codec, fingerprint
from .cotangent_codec import EncodedCotangent, deferred_tree, is_encoded
from .encoder import TensorEncoder
from .errors import TraceCorruptError
from .packing import PackedTensors
from .records import CapturedForward, CapturedStep, ForwardRecord, SkipRecord, StepRecord
from .rngstates import decode_rng
from .rowids import ID_BYTES
from .schema import sample_key, skip_key, step_key
from .state import decode_tensors, encode_checkpoint
from .trees import build_tree

if TYPE_CHECKING:
    from .bounds import HeaderBounds

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
    "content_ids",
]

Rows = Callable[[str], list[torch.Tensor]]  # content id -> the stored rows of that sample
Bases = Callable[[int], torch.Tensor]  # n -> the base RNG state rng/{n:08d} (rngstates.py)


def _no_bases(n: int) -> torch.Tensor:
    raise TraceCorruptError(f"a forward's RNG state refers to base rng/{n:08d}, none given")


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
        out.append((sample_key(cid), {"rows": enc.count("inputs", rows)}))
        enc.pace()
    return ids


def _encode_forward(
    enc: TensorEncoder, f: CapturedForward, out: list[tuple[str, Any]]
) -> dict[str, Any]:
    rows = _encode_samples(enc, f, out)
    outputs = f.outputs or [None] * len(f.cotangents)
    return {
        "batch_size": f.batch_size,
        "rows": bytes.fromhex("".join(rows)),  # one call, not one per row
        "ids": f.user_ids,
        "slots": [
            {"dtype": codec.dtype_name(t.dtype), "shape": list(t.shape[1:])} for t in f.slots
        ],
        "args": f.args,
        "kwargs": f.kwargs,
        "tensors": enc.count("inputs", [enc.tensor(t) for t in f.tensors]),
        "output": f.output,
        "cotangents": [
            None if c is None else enc.cotangent(o, c) for o, c in zip(outputs, f.cotangents)
        ],
        "rng_state": enc.rng("rng_state", f.rng_state, out),
        "cuda_rng_state": (
            None if f.cuda_rng_state is None else enc.rng("cuda_rng_state", f.cuda_rng_state, out)
        ),
        "training": f.training,
        "mode_overrides": f.mode_overrides,
        "buffers": None if f.buffers is None else enc.count("buffers", enc.buffers(f.buffers)),
        "grad_scale": f.grad_scale,
        **({"autocast": f.autocast} if f.autocast else {}),
    }


def _exact(a: Any, b: Any) -> bool:
    return msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True)


def _encode_groups(
    groups: list[dict[str, Any]], header: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """``{"group_changes": [...]}``: per group, the hyperparameters whose stored bytes differ
    from the trace header's (usually the learning rate alone); ``{"groups": groups}`` whole
    when a group lacks a hyperparameter of the header (or there is no header)."""
    if (
        header is None
        or len(header) != len(groups)
        or any(h.keys() - g.keys() for g, h in zip(groups, header))
    ):
        return {"groups": groups}
    changes = [
        {k: v for k, v in g.items() if k not in h or not _exact(v, h[k])}
        for g, h in zip(groups, header)
    ]
    return {"group_changes": changes}


def _decode_groups(raw: dict[str, Any], bounds: HeaderBounds | None, where: str) -> Any:
    """A step record's per-group hyperparameters, whole (see ``_encode_groups``)."""
    if "group_changes" not in raw:
        return raw["groups"]
    changes = raw["group_changes"]
    if bounds is None or not isinstance(changes, list) or len(changes) != len(bounds.groups):
        raise TraceCorruptError(f"{where}: its hyperparameter changes do not fit the header")
    if not all(isinstance(c, dict) for c in changes):
        raise TraceCorruptError(f"{where}: its hyperparameter changes are malformed")
    return [{**h, **c} for h, c in zip(bounds.groups, changes)]


def encode_step(enc: TensorEncoder, s: CapturedStep) -> list[tuple[str, bytes]]:
    """The stored records of one step: new samples, the step, and its checkpoint if any."""
    out: list[tuple[str, Any]] = []
    grads = s.grads
    enc.raw_bytes += s.grad_bytes + 4 * (
        grads.numel()
        if isinstance(grads, PackedTensors)
        else sum(g.numel() for g in grads.values())
    )
    rec = {
        "index": s.index,
        "grads": enc.count("gradients", enc.gradients(s.grads)),
        **_encode_groups(s.groups, enc.header_groups),
        "tensor_hyperparams": s.tensor_hyperparams,
        "forwards": [_encode_forward(enc, f, out) for f in s.forwards],
        "buffers": None if s.buffers is None else enc.count("buffers", enc.buffers(s.buffers)),
    }
    if s.fingerprints is not None:
        rec["fingerprints"] = enc.count(
            "fingerprints", fingerprint.encode(s.fingerprints, enc.tensor, enc.param_names)
        )
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
    raw: dict[str, Any], bounds: HeaderBounds | None = None, where: str = "a step record"
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, str]]]:
    """Only what the optimizer needs from a step record: grads, groups, tensor-typed keys
    (checked against the trace header when ``bounds`` is given)."""
    try:
        groups = _decode_groups(raw, bounds, where)
        if bounds is None:
            if raw["grads"].get("packed") == 1:
                raise TraceCorruptError(f"{where}: packed gradients need the trace header")
            return decode_tensors(raw["grads"]), groups, raw.get("tensor_hyperparams") or []
        grads = bounds.grads(raw["grads"], f"{where}, grads")
        groups, tkeys = bounds.groups_of(groups, raw.get("tensor_hyperparams"), where)
        return grads, groups, tkeys
    except (KeyError, TypeError, AttributeError) as e:
        raise TraceCorruptError(f"{where} is malformed ({e!r:.200})") from e


def decode_step(
    raw: dict[str, Any],
    group_of: dict[str, int],
    forwards: list[ForwardRecord],
    where: str,
    bounds: HeaderBounds | None = None,
) -> StepRecord:
    """A step record, given its forwards (decoded with ``decode_forward``)."""
    t = raw["index"]
    try:
        grads, groups, tkeys = decode_update(raw, bounds, where)
        buffers = raw.get("buffers")
        if buffers is not None:
            at = f"{where}, buffers"
            buffers = bounds.buffer_map(buffers, at) if bounds else decode_tensors(buffers)
        fps = raw.get("fingerprints")
        if fps is not None:
            free = bounds.free if bounds else lambda o, at: codec.decode_tensor(o, where=at)
            names = list(bounds.params) if bounds else None
            fps = fingerprint.decode(fps, where, free, names)
        return StepRecord(
            index=t,
            grads=grads,
            groups=groups,
            group_of=dict(group_of),
            forwards=forwards,
            buffers=buffers,
            tensor_hyperparams=tkeys,
            fingerprints=fps,
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise TraceCorruptError(f"{where}: step record {t} is malformed ({e!r:.200})") from e


def content_ids(f: dict[str, Any], where: str) -> list[str]:
    """The content ids of a forward's rows: stored as their 16-byte digests side by side, or
    (before schema version 2) as a list of hex strings."""
    rows = f["rows"]
    if isinstance(rows, bytes) and len(rows) % ID_BYTES == 0:
        return [rows[i : i + ID_BYTES].hex() for i in range(0, len(rows), ID_BYTES)]
    if isinstance(rows, list) and all(isinstance(c, str) for c in rows):
        return rows
    raise TraceCorruptError(f"{where}: a forward's rows are malformed")


def _check_slots(specs: Any, where: str) -> list[dict[str, Any]]:
    """The input slot specs of a forward: a known dtype and a row shape each."""
    if not isinstance(specs, list) or not all(
        isinstance(s, dict)
        and s.get("dtype") in codec.DTYPES
        and isinstance(s.get("shape"), list)
        and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in s["shape"]
        )
        for s in specs
    ):
        raise TraceCorruptError(f"{where}: a forward's input slots are malformed")
    return specs


def decode_forward(
    f: dict[str, Any],
    rows_of: Rows,
    *,
    rank: int,
    where: str,
    bounds: HeaderBounds | None = None,
    index: int = 0,
    rng_of: Bases = _no_bases,
) -> ForwardRecord:
    """The ``index``-th forward of a record, its batched inputs rebuilt from the stored
    sample rows."""
    b = f["batch_size"]
    if not isinstance(b, int) or isinstance(b, bool):
        raise TraceCorruptError(f"{where}: a forward's batch size is malformed")
    cids = content_ids(f, where)
    if len(cids) != b:
        raise TraceCorruptError(f"{where}: a forward lists {len(cids)} rows for batch size {b}")
    specs = _check_slots(f["slots"], where)
    samples = [rows_of(c) for c in cids]
    if any(len(s) != len(specs) for s in samples):
        raise TraceCorruptError(f"{where}: a stored sample does not have one row per input slot")
    slots = []
    for k, spec in enumerate(specs):
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
    if bounds is None:
        free = rng = lambda obj, at: codec.decode_tensor(obj, where=at)  # noqa: E731
        buffer_map = lambda d, at: decode_tensors(d)  # noqa: E731
    else:
        free, rng, buffer_map = bounds.free, bounds.rng, bounds.buffer_map
    consts = [free(t, f"{where}, input tensor {i}") for i, t in enumerate(f["tensors"])]
    limit = None if bounds is None else bounds.free_bytes
    cots: list[Any] = []
    for i, c in enumerate(f["cotangents"]):
        at = f"{where}, forward {index}, cotangent {i}"
        if c is None:
            cots.append(None)
        elif is_encoded(c):  # the cotangent codec: needs the replayed output when it has ce rows
            enc = EncodedCotangent(c, where=at, max_bytes=limit)
            cots.append(enc if enc.needs_output else enc.resolve(None))
        else:
            cots.append(free(c, f"{where}, cotangent {i}"))
    args = build_tree(f["args"], slots, consts)
    kwargs = build_tree(f["kwargs"], slots, consts)
    ids = f.get("ids")
    if ids is not None and (
        not isinstance(ids, list)
        or len(ids) != b
        or not all(isinstance(i, str | int) and not isinstance(i, bool) for i in ids)
    ):
        raise TraceCorruptError(f"{where}: a forward lists sample ids that do not fit its batch")
    return ForwardRecord(
        args=tuple(args),
        kwargs=dict(kwargs),
        cotangent=deferred_tree(f["output"], cots, where),
        ids=list(ids) if ids is not None else list(cids),
        rng_state=decode_rng(f["rng_state"], rng_of, rng, f"{where}, rng_state"),
        cuda_rng_state=None
        if f.get("cuda_rng_state") is None
        else decode_rng(f["cuda_rng_state"], rng_of, rng, f"{where}, cuda_rng_state"),
        training=bool(f["training"]),
        mode_overrides=dict(f.get("mode_overrides") or {}),
        buffers=None if f.get("buffers") is None else buffer_map(f["buffers"], f"{where}, buffers"),
        grad_scale=float(f.get("grad_scale", 1.0)),
        autocast=_autocast(f.get("autocast"), where),
        batch_size=b,
        content_ids=cids,
        rank=rank,
    )


def _autocast(raw: Any, where: str) -> dict[str, str]:
    """A forward's autocast regions, ``{device type: dtype name}``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        k in ("cpu", "cuda") and v in codec.DTYPES for k, v in raw.items()
    ):
        raise TraceCorruptError(f"{where}: a forward's autocast state is malformed")
    return dict(raw)


def decode_forwards(
    raw: dict[str, Any],
    rows_of: Rows,
    *,
    rank: int,
    where: str,
    bounds: HeaderBounds | None = None,
    rng_of: Bases = _no_bases,
) -> list[ForwardRecord]:
    """The forwards of a step or skip record."""
    t = raw.get("index")
    try:
        return [
            decode_forward(
                f, rows_of, rank=rank, where=where, bounds=bounds, index=k, rng_of=rng_of
            )
            for k, f in enumerate(raw["forwards"])
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TraceCorruptError(f"{where}: step record {t} is malformed ({e!r:.200})") from e


def decode_skip(
    raw: Any,
    n: int,
    rows_of: Rows,
    *,
    rank: int,
    where: str,
    bounds: HeaderBounds | None = None,
    rng_of: Bases = _no_bases,
) -> SkipRecord:
    """The ``n``-th skip record."""
    try:
        return SkipRecord(
            index=n,
            before_step=int(raw["before_step"]),
            reason=str(raw.get("reason", "")),
            forwards=[
                decode_forward(
                    f, rows_of, rank=rank, where=where, bounds=bounds, index=k, rng_of=rng_of
                )
                for k, f in enumerate(raw["forwards"])
            ],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TraceCorruptError(f"{where}: skip record {n} is malformed ({e!r})") from e


def decode_sample(raw: Any, where: str, bounds: HeaderBounds | None = None) -> list[torch.Tensor]:
    """The stored rows of one sample (one per batched input slot)."""
    try:
        if bounds is None:
            return [codec.decode_tensor(r, where=where) for r in raw["rows"]]
        return [bounds.free(r, f"{where}, row {i}") for i, r in enumerate(raw["rows"])]
    except (KeyError, TypeError) as e:
        raise TraceCorruptError(f"{where}: a sample record is malformed ({e!r})") from e
