"""Attention in a seeded row pass: a backward that takes all O seeds in one product.

A seeded pass (seeds.py) runs the backward once, vmapped over the O explained outputs. Through
scaled_dot_product_attention's math kernel, vmap batches each of the backward's products
P·V-shaped per (batch, head) over the seeds as well — thousands of tiny matrices (on the bench
SDPA model 3200 of 6 × 6): half of that pass's time. Inside `seeded_attention()` an attention
call (no dropout, no grouped-query heads, q, k and v of one leading shape) runs instead as
`_Attention`, the math kernel's softmax(q·kᵀ·scale + mask)·v, whose backward is the function
`_AttentionGrad` with a vmap rule: the seeds of an output gradient go into the rows of each
(batch, head) product, [O·L, E] · [E, S] instead of O products [L, E] · [E, S]. The same sums,
in another order; the per-row check still compares every result with autograd.

The mode holds only where it is entered (torch function modes are per thread), never in the
forwards that compute values or replay training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _probs(q: Tensor, k: Tensor, scale: float, causal: bool, mask: Tensor | None) -> Tensor:
    """softmax(q·kᵀ·scale + mask) as the math kernel computes it."""
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        rows, cols = s.shape[-2:]
        keep = torch.ones(rows, cols, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, -1)


def _grads(do: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, scale: float):
    """(dq, dk, dv) of softmax attention with probabilities p, for output gradient `do`."""
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv


class _AttentionGrad(torch.autograd.Function):
    """(dq, dk, dv); vmapped over `do` alone, the seeds ride in the products' rows."""

    @staticmethod
    def forward(do, q, k, v, p, scale):  # type: ignore[override]
        return _grads(do, q, k, v, p, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def vmap(info, in_dims, do, q, k, v, p, scale):  # type: ignore[override]
        if in_dims[0] is None or any(d is not None for d in in_dims[1:5]):
            size = info.batch_size  # anything else batched: the plain products, expanded
            moved = [
                t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(size, *t.shape)
                for t, d in zip((do, q, k, v, p), in_dims[:5])
            ]
            return _grads(*moved, scale), (0, 0, 0)
        do = do.movedim(in_dims[0], 0)  # [O, *lead, L, Ev]
        o, lead = do.shape[0], tuple(q.shape[:-2])
        rows, cols, ev = q.shape[-2], k.shape[-2], v.shape[-1]
        pf = p.unsqueeze(-3).expand(*lead, o, rows, cols).reshape(*lead, o * rows, cols)
        dp = do.movedim(0, -3).reshape(*lead, o * rows, ev) @ v.transpose(-1, -2)
        ds = pf * (dp - (dp * pf).sum(-1, keepdim=True))  # [*lead, O·L, S]
        dq = (ds @ k) * scale
        dst = ds.reshape(*lead, o, rows, cols).transpose(-1, -2).reshape(*lead, o * cols, rows)
        dk = (dst @ q) * scale
        dv = p.transpose(-1, -2) @ do.movedim(0, -2).reshape(*lead, rows, o * ev)
        return (
            dq.reshape(*lead, o, rows, -1).movedim(-3, 0),
            dk.reshape(*lead, o, cols, -1).movedim(-3, 0),
            dv.reshape(*lead, cols, o, ev).movedim(-2, 0),
        ), (0, 0, 0)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, mask, scale, causal):  # type: ignore[override]
        p = _probs(q, k, scale, causal, mask)
        return p @ v, p

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        q, k, v, _mask, scale, _causal = inputs
        ctx.save_for_backward(q, k, v, output[1])
        ctx.scale = scale
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, do, _dp):  # type: ignore[override]
        q, k, v, p = ctx.saved_tensors
        dq, dk, dv = _AttentionGrad.apply(do, q, k, v, p, ctx.scale)
        return dq, dk, dv, None, None, None


def _plain_call(args: tuple, kwargs: dict) -> tuple | None:
    """(q, k, v, mask, scale, causal) of an attention call `_Attention` computes, else None."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    given = dict(zip(names, args))
    if len(args) > len(names) or set(given) & set(kwargs):
        return None
    given.update(kwargs)
    q, k, v = given.get("query"), given.get("key"), given.get("value")
    mask = given.get("attn_mask")
    if set(given) - set(names) - {"enable_gqa"} or given.get("enable_gqa"):
        return None
    if not all(isinstance(t, Tensor) and t.dim() >= 2 for t in (q, k, v)):
        return None
    if given.get("dropout_p", 0.0) or q.dtype != k.dtype or k.dtype != v.dtype:
        return None
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2] or k.shape[-2] != v.shape[-2]:
        return None
    causal = bool(given.get("is_causal", False))
    if mask is not None and (not isinstance(mask, Tensor) or causal or mask.requires_grad):
        return None
    scale = given.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return q, k, v, mask, scale, causal


class _SeededAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _plain_call(tuple(args), dict(kwargs))
            if call is not None:
                return _Attention.apply(*call)[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def seeded_attention() -> Iterator[None]:
    """Inside: scaled_dot_product_attention calls that `_Attention` computes go to it."""
    with _SeededAttention():
        yield


__all__ = ["seeded_attention"]
