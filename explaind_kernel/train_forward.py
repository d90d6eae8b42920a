"""Training side by forward-mode AD: K[:, r] = c · (J Z_r), exact whatever couples the samples.

The recorded forward is replayed at θ_τ (recorded RNG state, module modes, buffers) under
`torch.func.jvp` with the adjoint row Z_r as the parameters' tangent, vmapped over a block of
rows: one forward-tangent pass of the whole batch per row, so train-mode batch norm's batch
statistics (and their tangents) are those of training, and the cost is about R forward-tangent
passes of the batch — no double backward, no B × P memory.

Dropout: vmap runs with randomness="same", so a random op draws one sample of its unbatched
shape from the replay's RNG stream, exactly the draw of the recorded forward (the tests compare
with the per-sample route, which replays the forward without vmap, at 1e-12 in float64). The
primal replay runs once per block of rows (each block restores the recorded RNG state).

Σ_i G_i = Jᵀc (for the component sums) comes from one plain backward of the same replay.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import jvp, vmap

from explaind_trace.reforward import tree_leaves, tree_to

from .errors import InputError
from .functional import FunctionalModel
from .persample.local import math_attention
from .train_blocks import counting_activations, mark_block, rows_per_block, tiny_row_groups

_DECOMPOSITIONS = False


def load_decompositions() -> None:
    """Make one dual tensor, quietly: torch's first forward-mode use scripts its jvp
    decompositions and warns that torch.jit.script is deprecated (its own code, not ours)."""
    global _DECOMPOSITIONS
    if _DECOMPOSITIONS:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))
    _DECOMPOSITIONS = True


def forward_products(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    forward,  # explaind_trace.ForwardRecord
    z_grad: Mapping[str, Tensor],
    *,
    block_rows: int,
    probe: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(K [B, R], {param: Σ_i G_i}) of one recorded forward against the adjoints `z_grad`
    ({name: [R, *shape]}). With `probe`, only the first two blocks of rows run (K's other
    columns stay zero; see `mark_block`: the calibration of training_mode="auto")."""
    load_decompositions()
    device, dtype = fm.device, fm.dtype
    names = list(z_grad)
    primals = {n: params[n].detach() for n in names}
    other = {n: params[n] for n in params if n not in z_grad}
    args = tree_to(tuple(forward.args), device, dtype)
    kwargs = tree_to(dict(forward.kwargs), device, dtype)
    cots = tree_leaves(tree_to(forward.cotangent, device, dtype))
    batch = len(forward.ids)
    rows = next(iter(z_grad.values())).shape[0] if z_grad else 0

    def outputs(p: Mapping[str, Tensor]) -> list[Tensor | None]:
        bufs = {k: v.clone() for k, v in buffers.items()}
        # fused attention kernels have no forward-mode formula; the tangents are computed
        # during the forward, so the math kernel (and its lock) is needed only here
        with math_attention(), fm.recorded_mode(forward):
            outs = tree_leaves(fm({**p, **other}, bufs, args, kwargs))
        if len(outs) != len(cots):
            raise InputError(
                f"the replayed output has {len(outs)} tensors but the trace recorded "
                f"{len(cots)} cotangents; pass a model of the traced architecture."
            )
        return outs

    with counting_activations(fm.module) as saved:
        grad_sum, keep = _grad_sum(outputs, primals, cots)
    live = [cots[j] for j in keep]

    def contracted(p: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        outs = outputs(p)
        return tuple(outs[j] for j in keep)

    def row(tangent: Mapping[str, Tensor]) -> Tensor:
        _, touts = jvp(contracted, (primals,), (dict(tangent),))
        total = torch.zeros(batch, dtype=dtype, device=device)
        for t, c in zip(touts, live):
            total = total + (t * c.to(t.dtype)).reshape(batch, -1).sum(1)
        return total

    k = torch.zeros(batch, rows, dtype=dtype, device=device)
    step = rows_per_block(saved[0], block_rows)  # train_blocks.py
    batched = vmap(row, randomness="same")
    for done, start in enumerate(range(0, rows, step), 1):
        stop = min(rows, start + step)
        block = {n: z_grad[n][start:stop].to(dtype) for n in names}
        with torch.no_grad():
            k[:, start:stop] = batched(block).T
        if mark_block(probe, done, -(-rows // step)):
            break
    return k, grad_sum


def _grad_sum(outputs, primals: Mapping[str, Tensor], cots) -> tuple[dict[str, Tensor], list[int]]:
    """Σ_i G_i = Jᵀc per parameter tensor by one backward of the replayed forward (two where
    some rows' cotangents are tiny: train_blocks.tiny_row_groups, so that no backward runs on
    subnormals), and the indices of the outputs that have a cotangent (the ones K contracts)."""
    leaves = {n: p.clone().requires_grad_(True) for n, p in primals.items()}
    sums = {n: torch.zeros_like(p) for n, p in primals.items()}
    with torch.enable_grad():
        outs = outputs(leaves)
        keep = [j for j, (o, c) in enumerate(zip(outs, cots)) if o is not None and c is not None]
        pairs = [(outs[j], cots[j]) for j in keep if outs[j].requires_grad]
        if not pairs:
            return sums, keep
        groups = tiny_row_groups([c.to(o.dtype) for o, c in pairs])
        for g_cots, unscale in groups:
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                list(leaves.values()),
                g_cots,
                allow_unused=True,
                retain_graph=len(groups) > 1,
            )
            for n, g in zip(primals, grads):
                if g is not None:
                    sums[n] = sums[n] + (g if unscale == 1.0 else g * unscale)
    return sums, keep
