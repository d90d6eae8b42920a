"""Training side by the double-backward trick: K[:, r] = c · (J Z_r) without forward-mode AD.

d/du ⟨Jᵀu, Z_r⟩ = J·Z_r: one backward with a graph (create_graph) gives s_r(u) = ⟨Jᵀu, Z_r⟩
for every adjoint row r, and a second backward of s_r with respect to u, batched over a block
of rows (`is_grads_batched`), gives the batch's output tangents J·Z_r. It works wherever
autograd can differentiate twice (train-mode batch norm and dropout included); forward-mode AD
(train_forward.py) gives the same tangents at a fraction of the cost where every op has a
forward-mode formula. O(R) passes, no B × P memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from .train_blocks import mark_block

log = logging.getLogger(__name__)


def jvp_products(
    pairs: list[tuple[Tensor, Tensor]],
    plist: list[Tensor],
    names: list[str],
    z_grad: Mapping[str, Tensor],
    batch: int,
    *,
    block_rows: int,
    batched: bool = True,
    probe: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor], bool]:
    """(K [B, R], {param: Σ_i G_i}, batched) from the replayed (output, cotangent) `pairs` and
    the parameter leaves `plist` (named `names`) they were computed from; R rows of `z_grad`
    at a time in blocks of `block_rows`. `batched` is False once a batched second backward
    failed (rows then go one at a time). With `probe`, only the first two blocks run
    (train_forward.mark_block)."""
    rows = next(iter(z_grad.values())).shape[0] if z_grad else 0
    outs = [o for o, _ in pairs]
    cots = [c.to(o.dtype) for o, c in pairs]
    # Σ_i G_i = Jᵀc, one plain backward
    gsum = torch.autograd.grad(outs, plist, cots, retain_graph=True, allow_unused=True)
    grad_sum = {
        n: (g if g is not None else torch.zeros_like(p)) for n, g, p in zip(names, gsum, plist)
    }
    us = [torch.zeros_like(o, requires_grad=True) for o in outs]
    jtu = torch.autograd.grad(outs, plist, us, create_graph=True, allow_unused=True)
    s_rows = None
    for n, g in zip(names, jtu):
        if g is None:
            continue
        v = z_grad[n].reshape(rows, -1) @ g.reshape(-1)
        s_rows = v if s_rows is None else s_rows + v
    k = torch.zeros(batch, rows, dtype=cots[0].dtype, device=cots[0].device)
    if s_rows is None or not s_rows.requires_grad:
        return k, grad_sum, batched
    eye = torch.eye(rows, dtype=s_rows.dtype, device=s_rows.device)
    for done, start in enumerate(range(0, rows, block_rows), 1):
        stop = min(rows, start + block_rows)
        tangents, batched = _row_tangents(s_rows, us, eye[start:stop], batched)
        for t, c in zip(tangents, cots):
            if t is None:
                continue
            k[:, start:stop] += (t * c.unsqueeze(0)).reshape(stop - start, batch, -1).sum(-1).T
        if mark_block(probe, done, -(-rows // block_rows)):
            break
    return k, grad_sum, batched


def _row_tangents(
    s_rows: Tensor, us: list[Tensor], sel: Tensor, batched: bool
) -> tuple[list[Tensor | None], bool]:
    if batched:
        try:
            got = torch.autograd.grad(
                s_rows, us, sel, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
            return list(got), True
        except RuntimeError as e:
            log.warning("batched output tangents failed (%s); looping over rows", e)
    per_row = [
        torch.autograd.grad(s_rows, us, r, retain_graph=True, allow_unused=True) for r in sel
    ]
    stacked = [
        None
        if all(row[j] is None for row in per_row)
        else torch.stack([row[j] if row[j] is not None else torch.zeros_like(u) for row in per_row])
        for j, u in enumerate(us)
    ]
    return stacked, False
