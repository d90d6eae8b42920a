"""Training side by the per-row layer rules: per-sample gradients of one replayed forward.

The recorded forward is replayed batched at θ_τ (recorded RNG state, module modes, buffers)
with persample's hooks on; one backward of Σ_i ⟨out_i, c_i⟩ gives every module the output
gradient of each sample — exact when samples do not interact — and the rules give G_i per
parameter tensor; K = Σ_n G_n Z_nᵀ, one matrix product per tensor.

Samples do interact through batch statistics (train-mode batch norm) or any batch-wise op, so
every `check_every`-th forward (the first included) is checked per sample: for a random
combination v = Σ_r u_r Z_r, K·u must equal ⟨c_i, (J v)_i⟩ from a replay with the
same RNG state (reverse-over-reverse). The caller uses a batched route (exact by construction) when this returns None.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from explaind_trace.reforward import tree_leaves, tree_to

from .functional import FunctionalModel
from .rowjac import CHECK_RTOL, reverse_jv

log = logging.getLogger(__name__)


def _inner(outs, cots) -> Tensor | None:
    total = None
    for o, c in zip(outs, cots):
        if o is None or c is None:
            continue
        v = (o * c.to(o.dtype)).sum()
        total = v if total is None else total + v
    return total


def rule_grads(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    forward,
    names: list[str],
) -> dict[str, Tensor] | None:
    """{name: [B, *shape]} per-sample gradients G_i = J(x_i)ᵀ c_i of the parameters `names`,
    or None when a parameter has no rule (not checked here: see `rows_check`)."""
    cap = fm.row_capture(names)
    if any(n not in cap.covered for n in names):
        return None
    batch = len(forward.ids)
    args = tree_to(tuple(forward.args), fm.device, fm.dtype)
    kwargs = tree_to(dict(forward.kwargs), fm.device, fm.dtype)
    cots = tree_leaves(tree_to(forward.cotangent, fm.device, fm.dtype))
    bufs = {k: v.clone() for k, v in buffers.items()}
    with fm.recorded_mode(forward), cap.capture(batch, params) as run:
        outs = tree_leaves(fm(run, bufs, args, kwargs))
        if len(outs) != len(cots):
            return None
        total = _inner(outs, cots)
        if total is None or not total.requires_grad:
            return None
        cap.backward(total)
    grads, failed = cap.gradients()
    if failed:
        return None
    return {
        n: grads[n] if n in grads else params[n].new_zeros(batch, *params[n].shape) for n in names
    }


def exact_sample_jv(
    fm: FunctionalModel, params, buffers, forward, v: Mapping[str, Tensor]
) -> Tensor:
    """[B] ⟨c_i, (J v)_i⟩ through the replayed batched forward (same RNG state), by
    reverse-over-reverse autograd: the derivative the batched routes contract."""
    args = tree_to(tuple(forward.args), fm.device, fm.dtype)
    kwargs = tree_to(dict(forward.kwargs), fm.device, fm.dtype)
    cots = tree_leaves(tree_to(forward.cotangent, fm.device, fm.dtype))
    batch = len(forward.ids)
    keep: list[int] = []

    def outputs(leaves):
        bufs = {k: b.clone() for k, b in buffers.items()}
        with fm.recorded_mode(forward):
            outs = tree_leaves(fm(dict(leaves), bufs, args, kwargs))
        keep[:] = [j for j, (o, c) in enumerate(zip(outs, cots)) if o is not None and c is not None]
        return [outs[j] for j in keep]

    tangents = reverse_jv(outputs, params, v)
    total = torch.zeros(batch, dtype=fm.dtype, device=fm.device)
    for j, t in zip(keep, tangents):
        if t is not None:
            total = total + (t * cots[j].to(t.dtype)).reshape(batch, -1).sum(1)
    return total.detach()


def rows_check(
    fm: FunctionalModel,
    params,
    buffers,
    forward,
    grads: Mapping[str, Tensor],
    z_grad: Mapping[str, Tensor],
    k: Tensor,
    seed: int,
) -> bool:
    """Whether the per-sample products K [B, R] hold per sample (see the module docstring)."""
    rows = k.shape[1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(rows, generator=g, dtype=torch.float64).to(k.device, k.dtype)
    v = {n: (u @ z_grad[n].reshape(rows, -1)).reshape(z_grad[n].shape[1:]) for n in z_grad}
    try:
        exact = exact_sample_jv(fm, params, buffers, forward, v)
    except (RuntimeError, NotImplementedError) as e:
        log.info("autograd cannot check per-sample gradients (%s)", str(e).splitlines()[0])
        return False
    got = k @ u
    batch = k.shape[0]
    scale = (
        sum(grads[n].reshape(batch, -1).abs() @ v[n].reshape(-1).abs() for n in z_grad)
        + exact.abs()
    )
    rtol = CHECK_RTOL.get(k.dtype, 2e-3)
    bad = (got - exact).abs() > rtol * scale + torch.finfo(k.dtype).tiny
    return not bool(bad.any())
