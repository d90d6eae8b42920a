"""What a run looks like before recording starts: named parameters, groups, metadata.

``inspect_run`` validates a model/optimizer pair (no side effects) and names every
optimized parameter; ``build_meta`` turns that into the trace's ``meta`` record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from . import codec
from .errors import RecordingError, TraceCorruptError
from .optimizers import capture_hyperparams, qualified_name, resolve_optimizer
from .schema import FORMAT, SCHEMA_VERSION, library_version

__all__ = ["RunLayout", "check_options", "inspect_run", "build_meta"]


@dataclass
class RunLayout:
    """Trainable parameters by name and how the optimizer groups them."""

    params: dict[str, torch.nn.Parameter]  # trainable, in named_parameters() order
    names: dict[int, str]  # id(param) -> name
    group_ids: list[list[int]]  # per optimizer group: ids of its trainable params
    group_names: list[list[str]]
    frozen_in_opt: list[torch.Tensor]  # optimized but requires_grad=False at start
    output_module: torch.nn.Module | None


def check_options(
    model: Any,
    optimizer: Any,
    *,
    checkpoint_every: Any,
    grad_codec: Any,
    compression_level: Any,
    scaler: Any,
) -> None:
    """Reject malformed recorder arguments, naming the bad one."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if grad_codec not in ("lossless", "bf16"):
        raise ValueError(f"grad_codec must be 'lossless' or 'bf16', got {grad_codec!r}")
    if not isinstance(compression_level, int) or not 1 <= compression_level <= 22:
        raise ValueError(f"compression_level must be an int in 1..22, got {compression_level!r}")
    if scaler is not None and not hasattr(scaler, "get_scale"):
        raise TypeError("scaler must be a torch.amp.GradScaler (or offer get_scale())")


def inspect_run(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, output: str | None
) -> RunLayout:
    """Validate the setup and name the parameters; raises ``RecordingError`` subclasses."""
    resolve_optimizer(type(optimizer))  # raises UnsupportedOptimizerError
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise RecordingError(
            "the model has no trainable parameters (requires_grad=True), so there is "
            "nothing to record. Unfreeze parameters before recording."
        )
    for n, p in params.items():
        try:
            codec.dtype_name(p.dtype)
        except TraceCorruptError as e:
            raise RecordingError(f"parameter {n!r}: {e}") from None
    names = {id(p): n for n, p in params.items()}
    all_params = {id(p) for p in model.parameters()}
    frozen: list[torch.Tensor] = []
    group_ids: list[list[int]] = []
    group_names: list[list[str]] = []
    for gi, group in enumerate(optimizer.param_groups):
        ids, gnames = [], []
        for p in group["params"]:
            if id(p) in names:
                ids.append(id(p))
                gnames.append(names[id(p)])
            elif id(p) in all_params:
                frozen.append(p)
            else:
                raise RecordingError(
                    f"param group {gi} of the optimizer holds a tensor of shape {tuple(p.shape)} "
                    "that is not a parameter of the model, so it cannot be named in the trace. "
                    "Record with the model that owns every optimized parameter."
                )
        group_ids.append(ids)
        group_names.append(gnames)
    if not any(group_ids):
        raise RecordingError(
            "none of the optimizer's parameters is a trainable parameter of the model; "
            "pass the optimizer that trains this model."
        )
    module = None
    if output is not None:
        try:
            module = model.get_submodule(output)
        except AttributeError as e:
            raise RecordingError(
                f"output={output!r} does not name a submodule of the model ({e}). "
                "Use a name from model.named_modules()."
            ) from None
    return RunLayout(params, names, group_ids, group_names, frozen, module)


def _describe(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def build_meta(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: RunLayout,
    *,
    output: str | None,
    checkpoint_every: int,
    grad_codec: str,
    level: int,
    grad_scaler: bool,
) -> dict[str, Any]:
    """The ``meta`` record: schema, versions, names/shapes/dtypes, optimizer, options."""
    groups = []
    for names, group in zip(layout.group_names, optimizer.param_groups):
        hp, tkeys = capture_hyperparams(group)
        groups.append({"params": names, "hyperparams": hp, "tensor_hyperparams": tkeys})
    first = next(iter(layout.params.values()))
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "library_version": library_version(),
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(),
        "model_class": qualified_name(type(model)),
        "params": [{"name": n, **_describe(p)} for n, p in layout.params.items()],
        "buffers": [{"name": n, **_describe(b)} for n, b in model.named_buffers() if b is not None],
        "optimizer": {
            "class": qualified_name(type(optimizer)),
            "rule": qualified_name(resolve_optimizer(type(optimizer))),
            "groups": groups,
        },
        "output_module": output,
        "checkpoint_every": checkpoint_every,
        "codec": {"grad_codec": grad_codec, "level": level, "lossy": grad_codec != "lossless"},
        "device": str(first.device),
        "grad_scaler": grad_scaler,
    }
