"""Trace layout: keys, schema version, and the encoding of captured records into store values.

Captured data (CPU tensors plus plain values) arrives here from the recorder's hooks; the
writer thread turns it into msgpack bytes. Decoding lives in ``reader.py``.

Input and output structures are stored as small trees whose nodes are maps with a ``k``
field: ``b`` (a batched input slot, rebuilt from the per-sample rows), ``t`` (the i-th tensor
of the record's ``tensors``/``cotangents`` list), ``v`` (a plain value), ``n`` (None),
``tuple``/``list`` (``items``) and ``dict`` (``keys`` and ``items``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import codec
from .packing import PackedTensors
from .rowids import RowIds

__all__ = [
    "SCHEMA_VERSION",
    "FORMAT",
    "META",
    "PROGRESS",
    "FINAL",
    "step_key",
    "ckpt_key",
    "skip_key",
    "sample_key",
    "CapturedForward",
    "CapturedStep",
    "CapturedState",
]

SCHEMA_VERSION = 1
FORMAT = "explaind-trace"
META = "meta"
PROGRESS = "progress"
FINAL = "final"


def library_version() -> str:
    """The installed explaind version (``0.1.0`` when running from a source tree)."""
    try:
        return importlib.metadata.version("explaind")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def yield_gil() -> None:
    """Hand the GIL to the training thread now. The writer runs stretches of pure Python
    (hashing rows, packing maps); without explicit hand-offs a training thread that asks for
    the GIL can wait a whole switch interval (5 ms) each time, which showed as a 20% slowdown."""
    time.sleep(0)


class GilPacer:
    """``yield_gil()`` at most once per ``interval`` seconds of the writer's work.

    A hand-off costs the writer a sleep and a wake-up, which on a busy machine preempts
    the training thread; pacing bounds the training thread's wait for the GIL (about one
    interval) without a hand-off after every small encode step.
    """

    def __init__(self, interval: float = 0.0002) -> None:
        self.interval = interval
        self._last = time.perf_counter()

    def __call__(self) -> None:
        now = time.perf_counter()
        if now - self._last >= self.interval:
            yield_gil()
            self._last = time.perf_counter()


def step_key(t: int) -> str:
    return f"step/{t:08d}"


def ckpt_key(t: int) -> str:
    return f"ckpt/{t:08d}"


def skip_key(n: int) -> str:
    return f"skip/{n:08d}"


def sample_key(content_id: str) -> str:
    return f"sample/{content_id}"


@dataclass
class CapturedForward:
    """One forward pass as the hooks saw it; tensors already copied to CPU."""

    batch_size: int
    args: Any  # tree (see module docstring)
    kwargs: Any
    slots: list[torch.Tensor]  # batched inputs, dim 0 == batch_size
    tensors: list[torch.Tensor]  # constant (non-batched) input tensors
    rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None
    training: bool
    mode_overrides: dict[str, bool]
    buffers: Mapping[str, torch.Tensor] | None
    user_ids: list[str] | None
    output: Any = None  # tree of the output's structure, leaves {"k": "t", "i": j}
    cotangents: list[torch.Tensor | None] = field(default_factory=list)
    grad_scale: float = 1.0


@dataclass
class CapturedState:
    """Parameters, buffers and optimizer state (per parameter name) at one instant."""

    step: int
    params: dict[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, Any]]


@dataclass
class CapturedStep:
    """Everything recorded for optimizer step ``index``."""

    index: int
    grads: Mapping[str, torch.Tensor]
    groups: list[dict[str, Any]]
    tensor_hyperparams: list[dict[str, str]]
    forwards: list[CapturedForward]
    buffers: Mapping[str, torch.Tensor] | None
    checkpoint: CapturedState | None = None


class Encoder:
    """Turns captured records into store values; remembers which samples are stored.

    Used by the writer thread only (not thread-safe). ``raw_bytes`` counts the gradient
    bytes as fp32 plus the input batch bytes; ``stored_bytes`` the bytes handed to the
    store (without the progress record).

    Values that repeat from record to record are encoded once: a buffer mapping handed over
    again (the recorder shares one mapping of copies while the buffers are unchanged, e.g. a
    step's buffers and the next forward's) and an RNG state with the same bytes as the last.
    Sample row ids come from ``RowIds``, which hashes a row again only when it is not cached.
    """

    def __init__(self, *, grad_codec: str = "lossless", level: int = 1) -> None:
        self.lossy = "bf16" if grad_codec == "bf16" else None
        self.level = level
        self.known_samples: set[str] = set()
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.pace = GilPacer()
        self.row_ids = RowIds()
        self._last_buffers: tuple[Mapping[str, torch.Tensor], dict[str, Any]] | None = None
        self._last_by_content: dict[str, tuple[tuple[Any, ...], bytes, dict[str, Any]]] = {}

    def tensor(self, t: torch.Tensor, *, lossy: bool = False) -> dict[str, Any]:
        encoded = codec.encode_tensor(t, lossy=self.lossy if lossy else None, level=self.level)
        self.pace()
        return encoded

    def tensors(self, d: Mapping[str, torch.Tensor], *, lossy: bool = False) -> dict[str, Any]:
        if isinstance(d, PackedTensors) and not (lossy and self.lossy):
            # the same maps as encode_tensor(view), from slices of the packed bytes
            out = {}
            for name, dtype, shape, raw in d.byte_items():
                out[name] = codec.encode_bytes(
                    raw, codec.dtype_name(dtype), shape, level=self.level
                )
                self.pace()
            return out
        return {k: self.tensor(v, lossy=lossy) for k, v in d.items()}

    def buffers(self, d: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``tensors(d)``, reused when ``d`` is the mapping encoded last (held, so its id is too)."""
        last = self._last_buffers
        if last is not None and last[0] is d:
            return last[1]
        encoded = self.tensors(d)
        self._last_buffers = (d, encoded)
        return encoded

    def repeated(self, slot: str, t: torch.Tensor) -> dict[str, Any]:
        """``tensor(t)``, reused when ``t`` has the dtype, shape and bytes ``slot`` had last."""
        raw = codec.tensor_u8(t).tobytes()
        key = (t.dtype, tuple(t.shape))
        last = self._last_by_content.get(slot)
        if last is not None and last[0] == key and last[1] == raw:
            return last[2]
        encoded = codec.encode_bytes(raw, codec.dtype_name(t.dtype), key[1], level=self.level)
        self._last_by_content[slot] = (key, raw, encoded)
        self.pace()
        return encoded

    def state(self, s: CapturedState) -> dict[str, Any]:
        return {
            "step": s.step,
            "params": self.tensors(s.params),
            "buffers": self.buffers(s.buffers),
            "optimizer_state": {
                name: {
                    k: self.tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()
                }
                for name, st in s.optimizer_state.items()
            },
        }

    def samples(self, f: CapturedForward, out: list[tuple[str, bytes]]) -> list[str]:
        """Content ids of the rows of ``f``; appends unseen samples to ``out``."""
        b = f.batch_size
        views = []
        for t in f.slots:
            u8 = codec.tensor_u8(t)  # a view of the captured copy, not another copy
            row_bytes = int(np.prod(t.shape[1:], dtype=np.int64)) * t.element_size()
            views.append((codec.dtype_name(t.dtype), list(t.shape[1:]), u8.reshape(b, row_bytes)))
            self.raw_bytes += t.numel() * t.element_size()
        # one keyed blake2b per row: the key covers every slot's dtype and row shape, the
        # message is the row's bytes from all slots side by side
        header = repr([(d, s) for d, s, _ in views]).encode()
        key = hashlib.blake2b(header, digest_size=32).digest()
        joined = (
            views[0][2] if len(views) == 1 else np.concatenate([v for _, _, v in views], axis=1)
        )
        ids = self.row_ids.ids(key, joined, self.pace)
        known = self.known_samples
        for i, cid in enumerate(ids):
            if cid in known:
                continue
            known.add(cid)
            rec = {
                "rows": [
                    codec.encode_bytes(rows[i], dtype, shape, level=self.level)
                    for dtype, shape, rows in views
                ]
            }
            out.append((sample_key(cid), codec.pack(rec)))
            self.pace()
        return ids

    def forward(self, f: CapturedForward, out: list[tuple[str, bytes]]) -> dict[str, Any]:
        rows = self.samples(f, out)
        return {
            "batch_size": f.batch_size,
            "rows": rows,
            "ids": f.user_ids,
            "slots": [
                {"dtype": codec.dtype_name(t.dtype), "shape": list(t.shape[1:])} for t in f.slots
            ],
            "args": f.args,
            "kwargs": f.kwargs,
            "tensors": [self.tensor(t) for t in f.tensors],
            "output": f.output,
            "cotangents": [None if c is None else self.tensor(c) for c in f.cotangents],
            "rng_state": self.repeated("rng_state", f.rng_state),
            "cuda_rng_state": (
                None
                if f.cuda_rng_state is None
                else self.repeated("cuda_rng_state", f.cuda_rng_state)
            ),
            "training": f.training,
            "mode_overrides": f.mode_overrides,
            "buffers": None if f.buffers is None else self.buffers(f.buffers),
            "grad_scale": f.grad_scale,
        }

    def step(self, s: CapturedStep) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        self.raw_bytes += sum(4 * g.numel() for g in s.grads.values())
        rec = {
            "index": s.index,
            "grads": self.tensors(s.grads, lossy=True),
            "groups": s.groups,
            "tensor_hyperparams": s.tensor_hyperparams,
            "forwards": [self.forward(f, out) for f in s.forwards],
            "buffers": None if s.buffers is None else self.buffers(s.buffers),
        }
        self.pace()
        out.append((step_key(s.index), codec.pack(rec)))
        if s.checkpoint is not None:
            out.append((ckpt_key(s.checkpoint.step), codec.pack(self.state(s.checkpoint))))
        self.stored_bytes += sum(len(v) for _, v in out)
        return out

    def skip(self, n: int, before_step: int, reason: str, forwards: list[CapturedForward]):
        out: list[tuple[str, bytes]] = []
        rec = {
            "index": n,
            "before_step": before_step,
            "reason": reason,
            "forwards": [self.forward(f, out) for f in forwards],
        }
        out.append((skip_key(n), codec.pack(rec)))
        self.stored_bytes += sum(len(v) for _, v in out)
        return out

    def final(self, s: CapturedState) -> list[tuple[str, bytes]]:
        out = [(FINAL, codec.pack(self.state(s)))]
        self.stored_bytes += len(out[0][1])
        return out
