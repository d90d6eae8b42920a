"""Folding per-row work of several groups or calls into one rule call (capture.py's helpers).

A row of G consecutive groups (quadrature nodes or kink pieces of one explained row) can be
summed after its per-row gradients (`_summed`), or before, by handing a folding rule (Linear,
Embedding) the groups' tokens side by side (`_folded`); the calls of several forwards over the
same rows go to it as one call the same way (`_merged`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Call


def _summed(got: dict[str, Tensor] | None, groups: int) -> dict[str, Tensor] | None:
    """Per-row gradients [R·groups, ...] (each row's groups consecutive) summed to [R, ...]."""
    if got is None or groups == 1:
        return got
    return {k: v.reshape(-1, groups, *v.shape[1:]).sum(1) for k, v in got.items()}


def _fold(t: Tensor, groups: int, keep: int) -> Tensor:
    """[R·groups, *tokens, *last] → [R, groups·tokens, *last] (`keep` last dims kept): a row's
    groups are consecutive, so this is a view of a contiguous tensor."""
    tail = tuple(t.shape[t.dim() - keep :])
    return t.reshape(t.shape[0] // groups, -1, *tail)


def _merged(calls: list[Call], rows: int) -> list[Call]:
    """Calls of a folding rule's module as one, tokens side by side (first input and output
    gradient), where their shapes allow; the rest as they are."""

    def tails(c: Call):
        a, g = c.args[0] if c.args else None, c.gout
        if not isinstance(a, Tensor) or not isinstance(g, Tensor) or g.dim() < 2:
            return None
        if a.dim() not in (g.dim(), g.dim() - 1) or a.shape[0] != rows or g.shape[0] != rows:
            return None
        keep = 1 + a.dim() - g.dim()
        return tuple(a.shape[a.dim() - keep :]), g.shape[-1], a.dtype

    ok = [c for c in calls if tails(c) is not None]
    if len(ok) < 2 or len({tails(c) for c in ok}) > 1:
        return calls
    keep = 1 + ok[0].args[0].dim() - ok[0].gout.dim()
    a = torch.cat([_fold(c.args[0], 1, keep) for c in ok], 1)
    g = torch.cat([_fold(c.gout, 1, 1) for c in ok], 1)
    one = Call((a,), {}, ok[0].state, ok[0].training, [], [g], merged=True)
    return [one] + [c for c in calls if all(c is not o for o in ok)]


def _folded(call: Call, rows: int, groups: int) -> Call | None:
    """The call of a folding rule seen over rows/groups rows with the groups' tokens side by
    side (first input and output gradient; an input with one dim fewer than the gradient,
    like an embedding's indices, keeps none), or None when they do not hold the rows."""
    a, g = call.args[0] if call.args else None, call.gout
    if not isinstance(a, Tensor) or not isinstance(g, Tensor) or g.dim() < 2:
        return None
    if a.dim() not in (g.dim(), g.dim() - 1) or a.shape[0] != rows or g.shape[0] != rows:
        return None
    args = (_fold(a, groups, 1 + a.dim() - g.dim()), *call.args[1:])
    grads = [_fold(g, groups, 1), *call.grads[1:]]
    return Call(args, call.kwargs, call.state, call.training, call.outputs, grads)
