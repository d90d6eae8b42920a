"""nn.Conv1d / nn.Conv2d: unfold the input into patches, then G_r = g_r · patches_rᵀ per group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Call, register_layer_rule, rows_first


def _pad_input(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]] | None:
    """The input padded as the convolution pads it, and the padding left for unfold."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x, (0,) * (x.dim() - 2)
        return None  # "same" may pad asymmetrically; the local rule handles it
    if module.padding_mode != "zeros":
        pad = module._reversed_padding_repeated_twice
        return F.pad(x, pad, mode=module.padding_mode), (0,) * (x.dim() - 2)
    return x, tuple(module.padding)


@register_layer_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module: nn.Module, call: Call, rows: int) -> dict[str, Tensor] | None:
    x, g = call.args[0] if call.args else None, call.gout
    nd = 1 if isinstance(module, nn.Conv1d) else 2
    if g is None or not rows_first(x, rows) or x.dim() != nd + 2:
        return None
    padded = _pad_input(module, x)
    if padded is None:
        return None
    x, padding = padded
    if nd == 1:  # a 1-d convolution is a 2-d one over a height of 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, dil, pad, stride = (
            (1, *module.kernel_size),
            (1, *module.dilation),
            (0, *padding),
            (1, *module.stride),
        )
    else:
        kernel, dil, pad, stride = module.kernel_size, module.dilation, padding, module.stride
    patches = F.unfold(x.to(g.dtype), kernel, dilation=dil, padding=pad, stride=stride)
    groups, c_out = module.groups, module.out_channels
    spots = patches.shape[-1]
    patches = patches.reshape(rows, groups, -1, spots)  # [R, G, C_in/G·k, L]
    g3 = g.reshape(rows, groups, c_out // groups, spots)  # [R, G, C_out/G, L]
    w = torch.einsum("rgol,rgkl->rgok", g3, patches)
    out = {"weight": w.reshape(rows, *module.weight.shape)}
    if "bias" in call.state:
        out["bias"] = g.reshape(rows, c_out, -1).sum(-1)
    return out


def conv_shift(module: nn.Module, call: Call, delta: dict[str, Tensor]) -> Tensor | None:
    w = delta.get("weight")
    if w is None:
        w = torch.zeros_like(call.state["weight"])
    return module._conv_forward(call.args[0], w, delta.get("bias"))


register_layer_rule(nn.Conv1d, nn.Conv2d, shift=conv_shift)(conv_rule)
