"""The typed records of a trace: what the recorder hands the writer and the reader hands out.

Plain dataclasses, no coding: each record kind is encoded and decoded in one module (see
``schema.py`` for the map of keys to modules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .options import RecordOptions

__all__ = [
    "TensorInfo",
    "GroupInfo",
    "OptimizerInfo",
    "TraceMeta",
    "ForwardRecord",
    "StepRecord",
    "SkipRecord",
    "Checkpoint",
    "CapturedForward",
    "CapturedStep",
]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class GroupInfo:
    params: tuple[str, ...]
    hyperparams: dict[str, Any]
    tensor_hyperparams: dict[str, str]


@dataclass(frozen=True)
class OptimizerInfo:
    class_name: str  # qualified name of the optimizer class used in training
    rule: str  # the registered class it resolved to
    groups: tuple[GroupInfo, ...]


@dataclass(frozen=True)
class TraceMeta:
    """What the trace says about the run (the ``meta`` record, see ``header.py``)."""

    schema_version: int
    library_version: str
    torch_version: str
    created: str
    model_class: str
    params: tuple[TensorInfo, ...]
    buffers: tuple[TensorInfo, ...]
    optimizer: OptimizerInfo
    output_module: str | None
    checkpoint_every: int
    grad_codec: str
    lossy: bool
    device: str
    raw: dict[str, Any] = field(repr=False, compare=False)
    rank: int = 0  # DDP: the rank that wrote this store (0 for single-process traces)
    world_size: int = 1  # DDP: number of ranks; the trace is merged from as many stores
    cotangent_scale: float = 1.0  # recorded cotangents = local ones × this (1/world_size)
    #: the options the run was recorded with (rebuilt from the header fields for traces
    #: written before the header held them)
    options: RecordOptions = field(default_factory=RecordOptions)
    #: the checksum every record carries ("xxh3-64"); None for traces written without
    checksum: str | None = None


@dataclass
class Checkpoint:
    """The state record: parameters, buffers and optimizer state (per parameter name).

    Written for ``ckpt/{t}`` (before optimizer step ``step``) and ``final`` (when recording
    ended, ``step`` = the number of steps). ``buffers`` are taken when that step ran, i.e.
    after its forwards (the same as ``TraceReader.buffers_at(step)``); the buffers before
    the very first forward are in ``step(0).forwards[0].buffers``.
    """

    step: int
    params: dict[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, Any]]
    #: the final record keeps, instead of the optimizer state (replay rebuilds it from the last
    #: checkpoint), its SHA-256 digest (``state.optimizer_digest``), checked bit for bit; then
    #: ``optimizer_state`` is empty. None for checkpoints and for older traces' final records.
    optimizer_digest: str | None = None


@dataclass
class ForwardRecord:
    """One recorded forward pass that contributed to a step (or to a skipped step)."""

    args: tuple
    kwargs: dict[str, Any]
    #: dL/d(output), same structure as the output (None leaves allowed); a trace recorded
    #: with the cotangent codec may hold a ``DeferredCotangent`` here, which
    #: ``resolve(output)`` turns into that tree given the replayed output of this forward
    cotangent: Any
    ids: list[int | str]  # sample id per batch row (user ids as given, or content ids)
    rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None
    training: bool
    mode_overrides: dict[str, bool]
    buffers: dict[str, torch.Tensor] | None
    grad_scale: float
    batch_size: int = 0
    #: the autocast regions the forward ran in, {device type: dtype name} (empty: none)
    autocast: dict[str, str] = field(default_factory=dict)
    content_ids: list[str] = field(default_factory=list)  # keys of the stored rows
    rank: int = 0  # DDP: the rank that ran this forward


@dataclass
class StepRecord:
    """What optimizer step ``index`` saw."""

    index: int
    grads: dict[str, torch.Tensor]
    groups: list[dict[str, Any]]
    group_of: dict[str, int]
    forwards: list[ForwardRecord]
    buffers: dict[str, torch.Tensor] | None
    tensor_hyperparams: list[dict[str, str]] = field(default_factory=list)
    #: gradients="recompute"/"auto": the fingerprint of each gradient the optimizer saw
    #: (``fingerprint.py``), the gradients themselves not stored; None: ``grads`` are stored.
    #: Replay fills ``grads`` with the recomputed, checked gradients.
    fingerprints: dict[str, dict[str, Any]] | None = None


@dataclass
class SkipRecord:
    """Forwards whose gradients were discarded without an optimizer step (AMP overflow)."""

    index: int
    before_step: int
    reason: str
    forwards: list[ForwardRecord]


# -- the write side: what the hooks captured, tensors already copied to CPU ----------------


@dataclass
class CapturedForward:
    """One forward pass as the hooks saw it (becomes a ``ForwardRecord`` when read)."""

    batch_size: int
    args: Any  # tree (see trees.py)
    kwargs: Any
    slots: list[torch.Tensor]  # batched inputs, dim 0 == batch_size
    tensors: list[torch.Tensor]  # constant (non-batched) input tensors
    rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None
    training: bool
    mode_overrides: dict[str, bool]
    buffers: Mapping[str, torch.Tensor] | None
    user_ids: list[int | str] | None
    autocast: dict[str, str] | None = None  # {device type: dtype name} of active autocast
    #: the buffers this forward ran with (``buffers`` or the last ones recorded before it);
    #: not stored, for the recorder's own gradient check (gradients="auto")
    buffers_in: Mapping[str, torch.Tensor] | None = None
    output: Any = None  # tree of the output's structure, leaves {"k": "t", "i": j}
    cotangents: list[torch.Tensor | None] = field(default_factory=list)
    grad_scale: float = 1.0
    #: the output leaves (for the cotangent codec; None where not kept); empty: none kept
    outputs: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class CapturedStep:
    """Everything recorded for optimizer step ``index`` (becomes a ``StepRecord``)."""

    index: int
    grads: Mapping[str, torch.Tensor]
    groups: list[dict[str, Any]]
    tensor_hyperparams: list[dict[str, str]]
    forwards: list[CapturedForward]
    buffers: Mapping[str, torch.Tensor] | None
    checkpoint: Checkpoint | None = None
    #: gradients not stored: their fingerprints (``fingerprint.py``) and their fp32 size
    fingerprints: dict[str, dict[str, Any]] | None = None
    grad_bytes: int = 0
    #: gradients="auto": why gradients are stored from this step on (the first such step)
    switch_reason: str | None = None
