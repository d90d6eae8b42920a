"""Hugging Face's Conv1D (GPT-2's projections): a Linear with the weight stored transposed,
``y = x W + b`` with W [in, out]. G_r = Σ_t a_{r,t} g_{r,t}ᵀ [in, out], bias Σ_t g_{r,t}.

Registered by qualified name (registry.register_layer_rule_by_name), so the kernel never
imports transformers: the rule is bound the first time a model holding the class is seen.
"""

from __future__ import annotations

from torch import Tensor, nn

from .linear import linear_rule, linear_shift
from .registry import Call, register_layer_rule_by_name

CONV1D = "transformers.pytorch_utils.Conv1D"


def conv1d_rule(module: nn.Module, call: Call, rows: int) -> dict[str, Tensor] | None:
    out = linear_rule(module, call, rows)  # per-row gradients of W stored as [out, in]
    if out is not None:
        out["weight"] = out["weight"].transpose(1, 2)
    return out


def conv1d_shift(module: nn.Module, call: Call, delta: dict[str, Tensor]) -> Tensor | None:
    if "weight" in delta:
        delta = {**delta, "weight": delta["weight"].T}
    return linear_shift(module, call, delta)


register_layer_rule_by_name(CONV1D, conv1d_rule, shift=conv1d_shift, fold=True)
