"""The typed records a trace reader hands out, and their decoding from stored maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import codec
from .errors import SchemaVersionError, TraceCorruptError
from .schema import FORMAT, SCHEMA_VERSION

__all__ = [
    "TensorInfo",
    "GroupInfo",
    "OptimizerInfo",
    "TraceMeta",
    "ForwardRecord",
    "StepRecord",
    "SkipRecord",
    "Checkpoint",
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
    """What the trace says about the run (the ``meta`` record)."""

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

    @staticmethod
    def decode(raw: Any, where: str) -> TraceMeta:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise TraceCorruptError(f"{where}: the meta record is not an ExPLAIND trace header")
        version = raw.get("schema_version")
        if not isinstance(version, int):
            raise TraceCorruptError(f"{where}: the trace has no valid schema_version")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where} was written with trace schema version {version}, newer than the "
                f"version {SCHEMA_VERSION} this explaind reads. Upgrade explaind to read it."
            )
        try:
            opt = raw["optimizer"]
            codec_opts = raw.get("codec", {})
            ddp = raw.get("ddp") or {}
            return TraceMeta(
                schema_version=version,
                library_version=str(raw.get("library_version", "")),
                torch_version=str(raw.get("torch_version", "")),
                created=str(raw.get("created", "")),
                model_class=str(raw.get("model_class", "")),
                params=tuple(
                    TensorInfo(p["name"], tuple(p["shape"]), p["dtype"]) for p in raw["params"]
                ),
                buffers=tuple(
                    TensorInfo(b["name"], tuple(b["shape"]), b["dtype"]) for b in raw["buffers"]
                ),
                optimizer=OptimizerInfo(
                    class_name=opt["class"],
                    rule=opt.get("rule", opt["class"]),
                    groups=tuple(
                        GroupInfo(
                            tuple(g["params"]),
                            dict(g["hyperparams"]),
                            dict(g.get("tensor_hyperparams", {})),
                        )
                        for g in opt["groups"]
                    ),
                ),
                output_module=raw.get("output_module"),
                checkpoint_every=int(raw["checkpoint_every"]),
                grad_codec=str(codec_opts.get("grad_codec", "lossless")),
                lossy=bool(codec_opts.get("lossy", False)),
                device=str(raw.get("device", "cpu")),
                raw=raw,
                rank=int(ddp.get("rank", 0)),
                world_size=int(ddp.get("world_size", 1)),
                cotangent_scale=float(ddp.get("cotangent_scale", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TraceCorruptError(f"{where}: the meta record is malformed ({e!r})") from e


@dataclass
class ForwardRecord:
    """One recorded forward pass that contributed to a step (or to a skipped step)."""

    args: tuple
    kwargs: dict[str, Any]
    cotangent: Any  # dL/d(output), same structure as the output (None leaves allowed)
    ids: list[str]  # sample id per batch row (user ids, or content ids by default)
    rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None
    training: bool
    mode_overrides: dict[str, bool]
    buffers: dict[str, torch.Tensor] | None
    grad_scale: float
    batch_size: int = 0
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


@dataclass
class SkipRecord:
    """Forwards whose gradients were discarded without an optimizer step (AMP overflow)."""

    index: int
    before_step: int
    reason: str
    forwards: list[ForwardRecord]


@dataclass
class Checkpoint:
    """Parameters and optimizer state (per parameter name) before optimizer step ``step``.

    ``buffers`` are taken when that step ran, i.e. after its forwards (the same as
    ``TraceReader.buffers_at(step)``); the buffers before the very first forward are in
    ``step(0).forwards[0].buffers``. For ``final()``: the state when recording ended.
    """

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, Any]]


def decode_tensors(d: Any) -> dict[str, torch.Tensor]:
    if not isinstance(d, dict):
        raise TraceCorruptError("expected a map of tensors")
    return {str(k): codec.decode_tensor(v) for k, v in d.items()}


def decode_checkpoint(raw: Any) -> Checkpoint:
    try:
        state = {
            name: {
                k: codec.decode_tensor(v) if codec.is_tensor_map(v) else v for k, v in st.items()
            }
            for name, st in raw["optimizer_state"].items()
        }
        return Checkpoint(
            step=int(raw["step"]),
            params=decode_tensors(raw["params"]),
            buffers=decode_tensors(raw["buffers"]),
            optimizer_state=state,
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise TraceCorruptError(f"a checkpoint record is malformed ({e!r})") from e


def build_tree(node: Any, slots: list[torch.Tensor], tensors: list[Any]) -> Any:
    """Rebuild a stored structure (see ``schema``); ``slots``/``tensors`` fill its leaves."""
    if not isinstance(node, dict) or "k" not in node:
        raise TraceCorruptError(f"malformed structure node {node!r:.80}")
    kind = node["k"]
    try:
        if kind == "b":
            return slots[node["i"]]
        if kind == "t":
            return tensors[node["i"]]
        if kind == "v":
            return node["v"]
        if kind == "n":
            return None
        if kind == "tuple":
            return tuple(build_tree(n, slots, tensors) for n in node["items"])
        if kind == "list":
            return [build_tree(n, slots, tensors) for n in node["items"]]
        if kind == "dict":
            return {k: build_tree(n, slots, tensors) for k, n in zip(node["keys"], node["items"])}
    except (IndexError, KeyError, TypeError) as e:
        raise TraceCorruptError(f"malformed structure node of kind {kind!r} ({e!r})") from e
    raise TraceCorruptError(f"unknown structure node kind {kind!r}")
