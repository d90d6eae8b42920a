"""nn.Embedding: row r's gradient scatters g_{r,t} into the table rows its tokens picked."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import Call, register_layer_rule, rows_first


@register_layer_rule(nn.Embedding)
def embedding_rule(module: nn.Module, call: Call, rows: int) -> dict[str, Tensor] | None:
    idx, g = call.args[0] if call.args else None, call.gout
    if g is None or not rows_first(idx, rows) or module.max_norm is not None:
        return None
    if module.scale_grad_by_freq:
        return None
    num, dim = module.num_embeddings, module.embedding_dim
    flat = idx.reshape(rows, -1)
    offset = torch.arange(rows, device=idx.device).unsqueeze(1) * num
    target = (flat + offset).reshape(-1)
    src = g.reshape(-1, dim)
    if module.padding_idx is not None:  # the padding row never receives a gradient
        keep = flat.reshape(-1) != module.padding_idx
        target, src = target[keep], src[keep]
    out = g.new_zeros(rows * num, dim).index_add_(0, target, src)
    return {"weight": out.reshape(rows, num, dim)}


def embedding_shift(module: nn.Module, call: Call, delta: dict[str, Tensor]) -> Tensor | None:
    w = delta.get("weight")
    if w is None:
        return None
    return nn.functional.embedding(call.args[0], w, module.padding_idx)


register_layer_rule(nn.Embedding, shift=embedding_shift, fold=True)(embedding_rule)
