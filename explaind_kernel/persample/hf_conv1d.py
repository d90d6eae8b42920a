"""Hugging Face's Conv1D (GPT-2's projections): a Linear with the weight stored transposed,
``y = x W + b`` with W [in, out]. G_r = Σ_t a_{r,t} g_{r,t}ᵀ [in, out], bias Σ_t g_{r,t}.

Registered by qualified name (registry.register_layer_rule_by_name), so the kernel never
imports transformers: the rule is bound the first time a model holding the class is seen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import Call, register_layer_rule_by_name, rows_first

CONV1D = "transformers.pytorch_utils.Conv1D"


def conv1d_rule(module: nn.Module, call: Call, rows: int) -> dict[str, Tensor] | None:
    a, g = call.args[0] if call.args else None, call.gout
    if g is None or not rows_first(a, rows) or a.dim() < 2:
        return None
    a3 = a.reshape(rows, -1, a.shape[-1])
    g3 = g.reshape(rows, -1, g.shape[-1])
    out = {"weight": torch.bmm(a3.to(g3.dtype).transpose(1, 2), g3)}
    if "bias" in call.state:
        out["bias"] = g3.sum(1)
    return out


def conv1d_shift(module: nn.Module, call: Call, delta: dict[str, Tensor]) -> Tensor | None:
    a = call.args[0]
    w = delta.get("weight")
    out = a.matmul(w) if w is not None else None
    b = delta.get("bias")
    if b is not None:
        out = b if out is None else out + b
    return out


register_layer_rule_by_name(CONV1D, conv1d_rule, shift=conv1d_shift)
