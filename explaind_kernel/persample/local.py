"""The local rule: per-row gradients of a module's own parameters by torch.func on that module.

For a module with no closed-form rule (nn.MultiheadAttention, a custom block, the root module's
own parameters such as a positional table) the gradient of row r is the vector-Jacobian product
of *this module's* forward at row r's input with row r's output gradient — vmapped over the
rows, so one batched backward of the module serves all rows (the way opacus treats layers it
has no formula for). It is exact when rows do not interact inside the module and nothing random
runs in it (torch.func refuses randomness); training_side.py and jacobian.py check every result
per row against forward-mode derivatives, so a module that breaks either assumption is caught.
"""

from __future__ import annotations

import contextlib

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from explaind_trace.reforward import STATE_LOCK

from .registry import Call, tensor_leaves


@contextlib.contextmanager
def math_attention():
    """A context in which scaled_dot_product_attention runs its composite (math) kernel, which
    torch.func can batch and differentiate twice; the fused CPU/CUDA kernels can do neither.

    The backend flags are process-wide: the section holds explaind_trace.reforward's
    STATE_LOCK, so that a forward replayed bit for bit in another thread (the prefetcher's
    recomputed gradients and codec cotangents) never runs under them."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with STATE_LOCK, sdpa_kernel([SDPBackend.MATH]):
        yield


def batch_dim(module: nn.Module) -> int:
    """The dim of a module's inputs and outputs that holds the rows."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


def local_rule(
    module: nn.Module, call: Call, rows: int, own: list[str]
) -> dict[str, Tensor] | None:
    """{name: [R, *shape]} for the module's direct parameters `own`, or None."""
    bdim = batch_dim(module)
    grads = call.grads
    if not own or not any(g is not None for g in grads):
        return None
    if call.training and any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()
    ):
        return None  # a recomputation would draw other masks than the recorded forward

    def batched(t) -> bool:
        return isinstance(t, Tensor) and t.dim() > bdim and t.shape[bdim] == rows

    args, kw_names = list(call.args), list(call.kwargs)
    flat = args + [call.kwargs[k] for k in kw_names]
    dims = [bdim if batched(x) else None for x in flat]
    if not any(d is not None for d in dims):
        return None
    if any(g is not None and not batched(g) for g in grads):
        return None
    params = {n: call.state[n].detach() for n in own}
    rest = {n: t.detach() for n, t in call.state.items() if n not in params}
    gdims = [bdim if g is not None else None for g in grads]

    def one(p, xs, gs):
        xs = [x.unsqueeze(bdim) if d is not None else x for x, d in zip(xs, dims)]
        a, kw = xs[: len(args)], dict(zip(kw_names, xs[len(args) :]))
        out = functional_call(module, {**rest, **p}, tuple(a), kw)
        total = 0.0
        for o, g in zip(tensor_leaves(out), gs):
            if g is not None and o is not None:
                total = total + (o.squeeze(bdim) * g).sum()
        return total

    per_row = vmap(grad(one), in_dims=(None, dims, gdims), out_dims=0)
    with math_attention():
        return per_row(params, flat, list(grads))
