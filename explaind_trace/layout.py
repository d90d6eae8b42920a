"""What a run looks like before recording starts: named parameters, groups, metadata.

``inspect_run`` validates a model/optimizer pair (no side effects) and names every
optimized parameter; ``header.encode_header`` turns that into the trace's ``meta`` record.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import codec
from .ddp import DDPInfo, rank_store_spec
from .errors import RecordingError, TraceCorruptError
from .optimizers import kernel_rules_loaded, qualified_name, support_for

__all__ = ["RunLayout", "check_arguments", "inspect_run", "store_location"]

logger = logging.getLogger(__name__)


@dataclass
class RunLayout:
    """Trainable parameters by name and how the optimizer groups them."""

    params: dict[str, torch.nn.Parameter]  # trainable, in named_parameters() order
    names: dict[int, str]  # id(param) -> name
    group_ids: list[list[int]]  # per optimizer group: ids of its trainable params
    group_names: list[list[str]]
    frozen_in_opt: list[torch.Tensor]  # optimized but requires_grad=False at start
    output_module: torch.nn.Module | None

    def check_groups(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse param groups that changed since recording started."""
        ids = [[id(p) for p in g["params"] if id(p) in self.names] for g in optimizer.param_groups]
        if ids != self.group_ids:
            raise RecordingError(
                "the optimizer's param groups changed after recording started (add_param_group or "
                "replaced params); a trace needs fixed groups. Create all groups before recording."
            )


def store_location(spec: Any, ddp: DDPInfo | None) -> Any:
    """Where this process writes: ``spec``, the rank's own store under DDP, or by default a
    new ``runs/explaind-<time>-<pid>.lmdb``."""
    if ddp is not None:
        return rank_store_spec(spec, ddp.rank)
    if spec is None:
        spec = os.path.join("runs", f"explaind-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.lmdb")
        logger.info("recording trace to %s", spec)
    return spec


def check_arguments(model: Any, optimizer: Any, scaler: Any) -> None:
    """Reject a model, optimizer or scaler of the wrong kind, naming it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if scaler is not None and not hasattr(scaler, "get_scale"):
        raise TypeError("scaler must be a torch.amp.GradScaler (or offer get_scale())")


def inspect_run(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, output: str | None
) -> RunLayout:
    """Validate the setup and name the parameters; raises ``RecordingError`` subclasses."""
    support = support_for(type(optimizer))  # raises UnsupportedOptimizerError
    if support.rule is None and kernel_rules_loaded():
        logger.warning(
            "optimizer %s is registered for recording and replay but has no kernel rule: the "
            "trace will replay, but the kernel cannot explain it until a rule is registered "
            "with explaind_kernel.register_rule",
            qualified_name(type(optimizer)),
        )
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
