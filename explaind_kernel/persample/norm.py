"""nn.LayerNorm and nn.BatchNorm1d/2d/3d: γ gets Σ g ⊙ x̂, β gets Σ g, per row.

x̂ is recomputed from the captured input: over the normalised trailing dims for LayerNorm;
from the running statistics for batch norm in eval mode, and from the batch statistics in
train mode (then rows interact through the statistics: training_side.py adds their part).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Call, register_layer_rule, rows_first


def _layer_xhat(module: nn.Module, call: Call, dtype: torch.dtype) -> Tensor | None:
    """x̂ of a LayerNorm call (the module's own kernel without the affine part)."""
    x = call.args[0] if call.args else None
    if not isinstance(x, Tensor):
        return None
    return F.layer_norm(x.to(dtype), tuple(module.normalized_shape), eps=module.eps)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over the batch and spatial dims of [B, C, ...]."""
    dims = (0, *range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


def uses_batch_stats(call: Call) -> bool:
    """Whether a batch-norm call normalised with the statistics of its own batch."""
    return call.training or call.state.get("running_mean") is None


def _batch_xhat(module: nn.Module, call: Call, dtype: torch.dtype) -> Tensor | None:
    """x̂ of a batch-norm call, from the batch statistics or the running ones as it used."""
    x = call.args[0] if call.args else None
    if not isinstance(x, Tensor) or x.dim() < 2:
        return None
    x = x.to(dtype)
    if uses_batch_stats(call):
        return F.batch_norm(x, None, None, training=True, eps=module.eps)
    mean, var = call.state["running_mean"].to(dtype), call.state["running_var"].to(dtype)
    return F.batch_norm(x, mean, var, training=False, eps=module.eps)


def _affine_grads(call: Call, xhat: Tensor, g: Tensor, keep: tuple[int, ...]):
    """{weight: Σ g ⊙ x̂, bias: Σ g} per row, summing every dim but the rows and `keep`."""
    dims = tuple(d for d in range(1, g.dim()) if d not in keep)
    out: dict[str, Tensor] = {}
    if "weight" in call.state:
        out["weight"] = (g * xhat).sum(dims) if dims else g * xhat
    if "bias" in call.state:
        out["bias"] = g.sum(dims) if dims else g
    return out


def _affine_shift(xhat: Tensor, delta: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    w, b = delta.get("weight"), delta.get("bias")
    if w is not None and b is not None:
        return torch.addcmul(b.reshape(shape), xhat, w.reshape(shape))
    if w is not None:
        return xhat * w.reshape(shape)
    if b is not None:
        return b.reshape(shape).expand_as(xhat)
    return torch.zeros_like(xhat)


def layer_norm_shift(module: nn.Module, call: Call, delta: dict[str, Tensor]) -> Tensor | None:
    xhat = _layer_xhat(module, call, next(iter(delta.values())).dtype)
    return None if xhat is None else _affine_shift(xhat, delta, tuple(module.normalized_shape))


@register_layer_rule(nn.LayerNorm, shift=layer_norm_shift)
def layer_norm_rule(module: nn.Module, call: Call, rows: int) -> dict[str, Tensor] | None:
    x, g = call.args[0] if call.args else None, call.gout
    if g is None or not rows_first(x, rows) or not call.state:
        return None
    if x.dim() - len(module.normalized_shape) < 1:
        return None
    xhat = _layer_xhat(module, call, g.dtype)
    keep = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
    return _affine_grads(call, xhat, g, keep)


def batch_norm_shift(module: nn.Module, call: Call, delta: dict[str, Tensor]) -> Tensor | None:
    xhat = _batch_xhat(module, call, next(iter(delta.values())).dtype)
    if xhat is None:
        return None
    return _affine_shift(xhat, delta, (1, -1) + (1,) * (xhat.dim() - 2))


@register_layer_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, shift=batch_norm_shift)
def batch_norm_rule(module: nn.Module, call: Call, rows: int) -> dict[str, Tensor] | None:
    x, g = call.args[0] if call.args else None, call.gout
    if g is None or not rows_first(x, rows) or x.dim() < 2 or not call.state:
        return None
    xhat = _batch_xhat(module, call, g.dtype)
    return _affine_grads(call, xhat, g, (1,))
