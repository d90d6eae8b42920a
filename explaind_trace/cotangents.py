"""Resolve the deferred cotangents of a step: replay each forward at θ_t, rebuild from its logits.

A trace recorded with ``cotangent_codec="auto"`` stores a cross-entropy cotangent as a target
and a scale per row (``cotangent_codec.py``); ``ForwardRecord.cotangent`` is then a
``DeferredCotangent``. ``resolve_forwards`` replaces it, in place, by the recorded tensors:
each forward runs again (``reforward``) at the parameters before its step, with the buffers it
saw, in the recorded dtype and on the recorded device — never in another compute dtype, whose
logits differ from the recorded ones. A replay that does not give the recorded logits bit for
bit raises ``CotangentDecodeError`` naming the step and forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .cotangent_codec import DeferredCotangent
from .records import ForwardRecord

__all__ = ["resolve_forwards", "needs_resolving", "replay_device"]


def needs_resolving(forwards: list[ForwardRecord]) -> bool:
    """Whether any of ``forwards`` holds a ``DeferredCotangent``."""
    return any(isinstance(f.cotangent, DeferredCotangent) for f in forwards)


def replay_device(recorded: str) -> torch.device:
    """The device a recorded forward runs again on: the recorded one when this machine has
    it (a CUDA trace on a machine without CUDA replays on the CPU, and its codec-stored
    cotangents then fail their checksum rather than come out wrong)."""
    device = torch.device(recorded)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def resolve_forwards(
    forwards: list[ForwardRecord],
    *,
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    output_module: str | None,
    device: torch.device | str = "cpu",
) -> None:
    """Replace every ``DeferredCotangent`` of ``forwards`` (one step's, in order) by its
    tensors. ``params``: θ before the step, as the trace holds it (the recorded dtype);
    ``buffers``: the buffers before the step's first forward (a forward that carries its own
    replaces them for itself and the next ones, as in training)."""
    if not needs_resolving(forwards):
        return
    from .reforward import reforward  # the one "run a recorded forward again" of the library

    device = torch.device(device)
    at = {n: p.detach().to(device) for n, p in params.items()}
    current: Mapping[str, Tensor] = buffers
    for f in forwards:
        if f.buffers is not None:
            current = f.buffers
        if not isinstance(f.cotangent, DeferredCotangent):
            continue
        bufs = {k: v.to(device) for k, v in current.items()}
        out: Any = reforward(model, at, bufs, f, output_module=output_module, grad=False)
        f.cotangent = f.cotangent.resolve(out)
