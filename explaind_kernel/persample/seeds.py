"""Seeded row passes: the forward over the base rows once, the backward seeded with every
explained output at once.

The expanded row pass repeats each base row (a test input, or an (input, group) pair at its own
point) once per explained output, so that one backward of the explained sum gives each row its
own output gradient; its forward then costs O times that of the base rows. A seeded pass runs
the forward over the base rows only and seeds the backward with all O explained outputs at once
(torch.func's vmap of torch.autograd.grad over the seeds; attention there by attention.py's
function, whose vmap rule puts the seeds into its products' rows), asking for the
gradient at every recorded module output directly. Afterwards each recorded call is laid out as
an expanded pass would have recorded it — its inputs repeated, its batched output gradients in
row order (j·O + o)·G + k — so the layer rules, the folding and the per-row check are unchanged.
Linear, LayerNorm and Embedding calls stay at the base rows instead: their rules here
(`base_rule`) take each input's O output gradients at once — for a Linear one product
[O·out, G·T] × [G·T, in] per input, where the expanded rows would cost O·G products
[out, T] × [T, in] and copies of the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from .embedding import embedding_rule
from .linear import linear_rule
from .local import batch_dim
from .norm import layer_norm_rule
from .registry import Call, layer_rule_for


def seeded_backward(
    outputs: list[Tensor],
    calls: list[tuple[nn.Module, Call]],
    taps: list[list],
    base: int,
    groups: int,
    keep: bool,
) -> int:
    """Fill every recorded slot (of `calls` (module, call) and of the direct reads' `taps`)
    with its gradient, seeded by each output's O values, and expand the calls to base·O rows
    (those `base_rule` treats stay at the base rows, marked `seeded`); returns base·O. Slots
    hold the recorded tensors until then."""
    width = int(outputs[0].shape[-1])
    slots = [s for _, c in calls for s in c.grads if s] + [s for s in taps if s]
    seeds = []
    for y in outputs:
        eye = torch.eye(width, dtype=y.dtype, device=y.device)
        seeds.append(eye.reshape(width, *([1] * (y.dim() - 1)), width).expand(width, *y.shape))
    got = _batched_grad(outputs, [s[0] for s in slots], seeds, keep)
    at = {id(s): g for s, g in zip(slots, got)}
    for module, call in calls:
        if _fits(module, call, base, at):
            call.seeded = True
            call.grads = [
                [at[id(s)]] if s and at.get(id(s)) is not None else [] for s in call.grads
            ]
            continue
        bdim = batch_dim(module)
        call.args = tuple(_rows(a, bdim, base, width, groups) for a in call.args)
        call.kwargs = {k: _rows(v, bdim, base, width, groups) for k, v in call.kwargs.items()}
        for s in call.grads:
            _fill(s, at, bdim, base, width, groups)
    for s in taps:
        _fill(s, at, 0, base, width, groups)
    return base * width


def _batched_grad(outputs, inputs, seeds, keep: bool) -> list[Tensor | None]:
    """torch.autograd.grad of `outputs` at `inputs` for every seed (dim 0 of `seeds`), by
    torch.func's vmap (whose functions may carry their own batching rules: attention.py);
    None for an input the outputs do not depend on."""
    unused: list[bool] = []

    def one(*seed):
        got = torch.autograd.grad(outputs, inputs, seed, allow_unused=True, retain_graph=keep)
        unused[:] = [g is None for g in got]
        return tuple(g if g is not None else x.new_zeros(()) for g, x in zip(got, inputs))

    got = vmap(one)(*seeds)
    return [None if u else g for g, u in zip(got, unused)]


def _fill(slot: list, at: dict, bdim: int, base: int, width: int, groups: int) -> None:
    g = at.get(id(slot)) if slot else None
    slot.clear()
    if g is not None:
        slot.append(_grad_rows(g, bdim, base, width, groups))


def _rows(t, bdim: int, base: int, width: int, groups: int):
    """An input with the base rows at `bdim` ([.., m·G, ..]) as the expanded pass's rows
    [.., m·O·G, ..]; anything else as it is."""
    if not isinstance(t, Tensor) or t.dim() <= bdim or t.shape[bdim] != base:
        return t
    pre, post, m = t.shape[:bdim], t.shape[bdim + 1 :], base // groups
    v = t.detach().reshape(*pre, m, 1, groups, *post).expand(*pre, m, width, groups, *post)
    return v.reshape(*pre, m * width * groups, *post)


def _grad_rows(g: Tensor, bdim: int, base: int, width: int, groups: int) -> Tensor:
    """A batched gradient [O, .., m·G, ..] (rows at `bdim` of the recorded tensor) as the
    expanded pass's [.., m·O·G, ..]."""
    shape = g.shape[1:]
    pre, post, m = shape[:bdim], shape[bdim + 1 :], base // groups
    v = g.reshape(width, *pre, m, groups, *post).movedim(0, len(pre) + 1)
    return v.reshape(*pre, m * width * groups, *post)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _fits(module: nn.Module, call: Call, base: int, at: dict) -> bool:
    """Whether `base_rule` treats this call: a Linear, LayerNorm or Embedding (with its
    built-in rule registered, of which the rule here is a faster form) whose first input and
    single output hold the base rows first."""
    fit = _BASE.get(type(module))
    if fit is not None and layer_rule_for(module) is not fit[2]:
        fit = None
    a = call.args[0] if call.args else None
    if fit is None or len(call.grads) != 1 or not isinstance(a, Tensor) or a.dim() < 1:
        return False
    g = at.get(id(call.grads[0])) if call.grads[0] else None
    if a.shape[0] != base or (g is not None and g.shape[1] != base):
        return False
    return fit[0](module, call, g)


def base_rule(
    module: nn.Module, calls: list[Call], width: int, groups: int, empty: Callable = _empty
) -> dict[str, Tensor]:
    """{local name: [m·O, *shape]} summed over `calls` (left at the base rows by
    `seeded_backward`, output gradients [O, base, ...]) and each input's G groups; the large
    outputs in `empty(shape, dtype, device)` (a workspace's)."""
    calls = [c for c in calls if c.gout is not None]
    return _BASE[type(module)][1](module, calls, width, groups, empty) if calls else {}


def _linear(module: nn.Module, calls: list[Call], width: int, groups: int, empty=_empty):
    g0 = calls[0].gout
    assert g0 is not None
    m, out = g0.shape[1] // groups, g0.shape[-1]
    a = torch.cat([c.args[0].detach().reshape(m, -1, c.args[0].shape[-1]) for c in calls], 1)
    # input j's output gradients as [tokens, O·out], each call's copied in once (whole rows of
    # `out` entries move: transposing tokens and features instead cost ~3 times as much)
    gs = [c.gout.reshape(width, m, -1, out) for c in calls]  # type: ignore[union-attr]
    g = torch.empty((m, sum(x.shape[2] for x in gs), width, out), dtype=g0.dtype, device=g0.device)
    at = 0
    for x in gs:
        g[:, at : at + x.shape[2]].copy_(x.permute(1, 2, 0, 3))
        at += x.shape[2]
    gt = g.view(m, at, width * out).transpose(1, 2)  # [O·out, tokens]: the BLAS reads it so
    w = empty((m, width * out, a.shape[-1]), gt.dtype, gt.device)
    got = {"weight": _bmm_blocked(gt, a.to(gt.dtype), w).view(m * width, out, a.shape[-1])}
    if "bias" in calls[0].state:
        got["bias"] = g.sum(1).reshape(m * width, out)
    return got


#: `_bmm_blocked`: per-input products of at least this many entries go in blocks of about
#: BLOCK_ENTRIES (a few hundred rows of the output, which stay in the core's L2 cache)
BLOCKED_FROM, BLOCK_ENTRIES = 1 << 20, 1 << 15


def _bmm_blocked(gt: Tensor, a: Tensor, out: Tensor) -> Tensor:
    """`torch.bmm(gt, a, out=out)` ([m, N, T] × [m, T, in]) with each large per-input
    product done as a batch of blocks of output rows (each entry the same T-term dot
    product; fp32 came out bitwise equal on the bench): with few tokens T the BLAS streams a
    large output badly (on the p = 97 Transformer's MLP, [4, 49664, 6] × [4, 6, 128] ran
    1.8 times faster in blocks of 256 rows)."""
    m, n, t = gt.shape
    width = a.shape[-1]
    if n * width < BLOCKED_FROM or gt.device.type != "cpu":
        return torch.bmm(gt, a, out=out)
    rows = max(1, BLOCK_ENTRIES // width)
    blocks = n // rows
    main = blocks * rows
    for j in range(m):
        aj = a[j].unsqueeze(0).expand(blocks, t, width)
        blocked = out[j, :main].view(blocks, rows, width)
        torch.bmm(gt[j, :main].reshape(blocks, rows, t), aj, out=blocked)
        if main < n:
            torch.mm(gt[j, main:], a[j], out=out[j, main:])
    return out


def _layer_norm(module: nn.Module, calls: list[Call], width: int, groups: int, empty=_empty):
    got: dict[str, Tensor] = {}
    shape = tuple(module.normalized_shape)
    for c in calls:
        g, x = c.gout, c.args[0].detach()
        assert g is not None
        xhat = F.layer_norm(x.to(g.dtype), shape, eps=module.eps)
        tokens = tuple(range(2, g.dim() - len(shape)))
        m = g.shape[1] // groups
        parts = {"weight": g * xhat, "bias": g}
        for name, t in parts.items():
            if name not in c.state:
                continue
            t = t.sum(tokens) if tokens else t  # [O, base, *shape]
            t = t.reshape(width, m, groups, *shape).sum(2).movedim(0, 1)
            t = t.reshape(m * width, *shape)
            got[name] = got[name] + t if name in got else t
    return got


def _tokens_fit(a: Tensor, g: Tensor | None, keep: int) -> bool:
    """The output gradient [O, *a's dims but the last `keep`, features]."""
    return g is None or tuple(g.shape[1:-1]) == tuple(a.shape[: a.dim() - keep])


def _linear_fits(m: nn.Module, c: Call, g: Tensor | None) -> bool:
    return c.args[0].dim() >= 2 and _tokens_fit(c.args[0], g, 1)


def _layer_norm_fits(m: nn.Module, c: Call, g: Tensor | None) -> bool:
    a = c.args[0]
    return bool(c.state) and a.dim() > len(m.normalized_shape) and _tokens_fit(a, g, 1)


def _embedding_fits(m: nn.Module, c: Call, g: Tensor | None) -> bool:
    plain = m.max_norm is None and not m.scale_grad_by_freq
    return plain and not c.args[0].is_floating_point() and _tokens_fit(c.args[0], g, 0)


def _embedding(module: nn.Module, calls: list[Call], width: int, groups: int, empty=_empty):
    """Row (j·O + o) scatters its output gradients into the table rows input j's tokens (of
    all its groups) picked; the padding row gets none."""
    num, dim = module.num_embeddings, module.embedding_dim
    g0 = calls[0].gout
    assert g0 is not None
    m = g0.shape[1] // groups
    out = empty((m * width * num, dim), g0.dtype, g0.device).zero_()
    dev = g0.device
    first = (torch.arange(m * width, device=dev) * num).reshape(m, width, 1)  # [m, O, 1]
    for c in calls:
        idx = c.args[0].reshape(m, 1, -1)  # [m, 1, G·T]
        target = (first + idx).reshape(-1)
        src = c.gout.reshape(width, m, -1, dim).transpose(0, 1).reshape(-1, dim)  # type: ignore[union-attr]
        if module.padding_idx is not None:
            keep = (idx != module.padding_idx).expand(m, width, idx.shape[-1]).reshape(-1)
            target, src = target[keep], src[keep]
        out.index_add_(0, target, src)
    return {"weight": out.view(m * width, num, dim)}


#: class → (whether a call fits, the rule over a module's seeded calls, the registered rule
#: it is a form of)
_BASE: dict[type, tuple[Callable, Callable, Callable]] = {
    nn.Linear: (_linear_fits, _linear, linear_rule),
    nn.modules.linear.NonDynamicallyQuantizableLinear: (_linear_fits, _linear, linear_rule),
    nn.LayerNorm: (_layer_norm_fits, _layer_norm, layer_norm_rule),
    nn.Embedding: (_embedding_fits, _embedding, embedding_rule),
}
