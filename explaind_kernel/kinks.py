"""Kinks: where a piecewise-smooth model bends along a step, so quadrature can split there.

A ReLU makes ∂f/∂θ jump where its argument changes sign, so along θ_t + s·Δθ_t the integrand
of J̄_t is only piecewise smooth and a Gauss rule loses its order on the piece holding the jump
(on a ReLU network Gauss-2 over the whole step is *less* exact than 100 midpoints). This module
finds those points cheaply — forward passes only, no Jacobians:

1. run the explained forward at both ends of the (sub-)segment under `_SwitchRecorder`, a
   `TorchFunctionMode` that records the *switching values* of every registered op (the argument
   of a ReLU; argument − threshold for hardtanh/relu6/clamp) and adds a zero probe to its output;
2. a backward of the summed explained outputs gives ∂f/∂(op output) at each end: units whose
   output cannot reach an explained output (zero at both ends) are not kinks of f;
3. a unit whose switching value changes sign is placed by the secant s* = v₀ / (v₀ − v₁), and its
   jump of df/ds is estimated as |∂f/∂a| · |v₁ − v₀|.

Per test input, the `limit` crossings with the largest estimated jumps become breakpoints;
the quadrature rule is then applied on every piece. A missed or misplaced kink costs accuracy
only: the engine measures each step's quadrature error exactly and reports it.

Ops register with `register_kink_op(fn, ...)(switches)`; built in: relu (all spellings),
leaky_relu, relu6, hardtanh, abs, clamp. Tensors are tied to test inputs by their first
dimension (the batch, or batch × tokens flattened batch-major); others are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

SwitchFn = Callable[[tuple, dict], list[Tensor]]
_OPS: dict[Any, SwitchFn] = {}


def register_kink_op(*funcs: Any) -> Callable[[SwitchFn], SwitchFn]:
    """Register `switches(args, kwargs) -> [tensors]` for `funcs`: the op's derivative jumps
    where any returned tensor changes sign."""

    def deco(fn: SwitchFn) -> SwitchFn:
        for f in funcs:
            _OPS[f] = fn
        return fn

    return deco


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


@register_kink_op(
    F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.leaky_relu, torch.abs,
    Tensor.abs,
)  # fmt: skip
def _zero_crossing(args: tuple, kwargs: dict) -> list[Tensor]:
    return [_arg(args, kwargs, 0, "input")]


@register_kink_op(F.relu6)
def _relu6(args: tuple, kwargs: dict) -> list[Tensor]:
    x = _arg(args, kwargs, 0, "input")
    return [x, x - 6.0]


@register_kink_op(F.hardtanh)
def _hardtanh(args: tuple, kwargs: dict) -> list[Tensor]:
    x = _arg(args, kwargs, 0, "input")
    return [x - _arg(args, kwargs, 1, "min_val", -1.0), x - _arg(args, kwargs, 2, "max_val", 1.0)]


@register_kink_op(torch.clamp, Tensor.clamp, torch.clip, Tensor.clip)
def _clamp(args: tuple, kwargs: dict) -> list[Tensor]:
    x = _arg(args, kwargs, 0, "input")
    bounds = (_arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max"))
    return [x - b for b in bounds if b is not None]


class _SwitchRecorder(TorchFunctionMode):
    """Records the switching values of registered ops and adds a zero probe to their outputs."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.switches: list[list[Tensor]] = []
        self.probes: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _OPS.get(func)
        values = None
        if rule is not None:
            with torch.no_grad():  # before the call: in-place spellings overwrite the argument
                values = [v.detach().clone() for v in rule(args, kwargs)]
        out = func(*args, **kwargs)
        if values is None or not isinstance(out, Tensor) or not out.is_floating_point():
            return out
        if out.dim() == 0 or out.shape[0] % self.n:
            return out  # cannot be tied to test inputs
        per_input = out.numel() // self.n
        if any(v.numel() != out.numel() for v in values):
            return out
        probe = torch.zeros_like(out, requires_grad=True)
        self.switches.append([v.reshape(self.n, per_input) for v in values])
        self.probes.append(probe)
        return out + probe


def record_switches(
    forward: Callable[[], Tensor], n: int
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Run `forward()` (→ explained values [n·O]) recording every registered op: returns its
    switching values [n, m] and ∂(Σ explained)/∂(op output) [n, m], per call."""
    rec = _SwitchRecorder(n)
    with torch.enable_grad():
        with rec:
            out = forward()
        grads: Sequence[Tensor | None] = ()
        if rec.probes and out.requires_grad:
            grads = torch.autograd.grad(out.sum(), rec.probes, allow_unused=True)
    sens = [
        (g.detach().reshape(n, -1).abs() if g is not None else torch.zeros_like(p).reshape(n, -1))
        for g, p in zip(grads or [None] * len(rec.probes), rec.probes)
    ]
    return rec.switches, sens


def breakpoints(
    grid: Sequence[float],
    records: Sequence[tuple[list[list[Tensor]], list[Tensor]]],
    n: int,
    limit: int,
) -> list[np.ndarray]:
    """Per test input, up to `limit` sorted crossing points in (0, 1), largest jumps first,
    from `record_switches` at the increasing points `grid` (0 … 1): a sign change between two
    neighbouring points is placed by the secant inside that interval."""
    empty = [np.zeros(0) for _ in range(n)]
    if limit <= 0 or not records or not records[0][0]:
        return empty
    first = records[0]
    for sw, _ in records[1:]:  # every forward must have taken the same route
        if len(sw) != len(first[0]) or any(
            len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b))
            for a, b in zip(sw, first[0])
        ):
            return empty
    places, sizes = [], []
    for c in range(len(first[0])):
        sens = torch.stack([r[1][c] for r in records]).amax(0).double()
        for j in range(len(first[0][c])):
            vals = [r[0][c][j].double() for r in records]
            for g in range(len(grid) - 1):
                v0, v1, width = vals[g], vals[g + 1], grid[g + 1] - grid[g]
                cross = ((v0 > 0) != (v1 > 0)) & (sens > 0)
                frac = v0 / (v0 - v1).where(cross, torch.ones_like(v0))
                places.append(torch.where(cross, grid[g] + width * frac.clamp(0.0, 1.0), 0.0))
                sizes.append(torch.where(cross, sens * (v1 - v0).abs() / width, -1.0))
    s_all, size_all = torch.cat(places, 1), torch.cat(sizes, 1)
    top_size, top_idx = size_all.topk(min(limit, size_all.shape[1]), dim=1)
    top_s = s_all.gather(1, top_idx)
    out = []
    for i in range(n):
        keep = top_s[i][top_size[i] > 0].cpu().numpy()
        out.append(np.unique(keep[(keep > 1e-9) & (keep < 1 - 1e-9)]))
    return out


def piece_nodes(
    cuts: list[np.ndarray], nodes: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rule applied on every piece between cuts: flat (input index, s, weight) arrays."""
    rows, ss, ws = [], [], []
    for i, c in enumerate(cuts):
        edges = np.concatenate([[0.0], c, [1.0]])
        a, b = edges[:-1, None], edges[1:, None]
        ss.append((a + (b - a) * nodes[None, :]).ravel())
        ws.append(((b - a) * weights[None, :]).ravel())
        rows.append(np.full(ss[-1].size, i, dtype=np.int64))
    return np.concatenate(rows), np.concatenate(ss), np.concatenate(ws)
