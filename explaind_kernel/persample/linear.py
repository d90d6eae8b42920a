"""nn.Linear (any number of leading dims): G_r = Σ_t g_{r,t} a_{r,t}ᵀ, bias Σ_t g_{r,t}."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Call, register_layer_rule, rows_first


@register_layer_rule(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def linear_rule(module: nn.Module, call: Call, rows: int) -> dict[str, Tensor] | None:
    a, g = call.args[0] if call.args else None, call.gout
    if g is None or not rows_first(a, rows) or a.dim() < 2:
        return None
    a3 = a.reshape(rows, -1, a.shape[-1])
    g3 = g.reshape(rows, -1, g.shape[-1])
    out = {"weight": torch.bmm(g3.transpose(1, 2), a3.to(g3.dtype))}
    if "bias" in call.state:
        out["bias"] = g3.sum(1)
    return out


def linear_shift(module: nn.Module, call: Call, delta: dict[str, Tensor]) -> Tensor | None:
    a = call.args[0]
    w, b = delta.get("weight"), delta.get("bias")
    if w is not None:
        return F.linear(a.to(w.dtype), w, b)  # one fused product and bias
    return b


register_layer_rule(
    nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, shift=linear_shift, fold=True
)(linear_rule)
