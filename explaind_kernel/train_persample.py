"""Per-sample gradients of a replayed batch: one-hot row cotangents through its backward.

G_i = J(x_i)ᵀ c_i for a block of batch rows by one backward vmapped over one-hot cotangents
(`is_grads_batched`), exact whatever couples the samples in the forward (the replay is the
batched one); the "per_sample" route of training_side.py contracts them with the adjoints.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .train_blocks import row_scales

log = logging.getLogger(__name__)


def block_grads(
    pairs: list[tuple[Tensor, Tensor]], plist: list[Tensor], start: int, stop: int, batched: bool
) -> tuple[list[Tensor | None], bool]:
    """Per-sample gradients of rows [start, stop): list over params of [b, *shape]. Each row's
    cotangent is scaled by a power of two (train_blocks.row_scales: bitwise the same
    gradients, but no subnormal backward) and its gradients unscaled. `batched` is False once
    a batched backward failed (rows then go one at a time); the second value says whether this
    block's backward was batched."""
    b = stop - start
    scale, unscale = row_scales([c for _, c in pairs], start, stop)

    def rows_of(s: Tensor, t: Tensor) -> Tensor:
        return s.to(t.dtype).reshape((-1,) + (1,) * (t.dim() - 1))

    if batched:
        try:
            grad_outputs = []
            for o, c in pairs:
                e = torch.zeros((b,) + tuple(o.shape), dtype=o.dtype, device=o.device)
                idx = torch.arange(b, device=o.device)
                cb = c[start:stop].to(o.dtype)
                e[idx, idx + start] = cb * rows_of(scale, cb)
                grad_outputs.append(e)
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                plist,
                grad_outputs,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
            return [None if g is None else g * rows_of(unscale, g) for g in grads], True
        except RuntimeError as e:
            log.warning("batched per-sample gradients failed (%s); looping over rows", e)
    per_row: list[list[Tensor | None]] = []
    for r in range(start, stop):
        grad_outputs = []
        for o, c in pairs:
            e = torch.zeros_like(o)
            e[r] = c[r].to(o.dtype) * float(scale[r - start])
            grad_outputs.append(e)
        per_row.append(
            list(
                torch.autograd.grad(
                    [o for o, _ in pairs],
                    plist,
                    grad_outputs,
                    retain_graph=True,
                    allow_unused=True,
                )
            )
        )
    out: list[Tensor | None] = []
    for j, p in enumerate(plist):
        col = [row[j] for row in per_row]
        if all(g is None for g in col):
            out.append(None)
            continue
        g = torch.stack([g if g is not None else torch.zeros_like(p) for g in col])
        out.append(g * rows_of(unscale, g))
    return out, False
