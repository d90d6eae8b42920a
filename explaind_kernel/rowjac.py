"""Test-side Jacobians of all rows of a chunk in one pass, by the per-row layer rules.

Rows are (test input, explained output) pairs. The chunk's inputs are repeated once per
explained output, so that row r = i·O + o of one forward holds input i; the backward of
Σ_r y_r[o(r)] then gives every module the output gradient of each row separately (eval mode:
rows do not interact), and persample's rules turn those into {name: [R, *shape]}. Parameters
no rule covers go through torch.func (vmap of jacrev) restricted to them.

Every `check_every`-th evaluation (the first included) is checked per row: J·v for a random
direction v must equal autograd's (reverse-over-reverse, at θ). A failure — rows that interact,
a module that reads its parameters outside its forward, a wrong rule — hands the test side to
the torch.func route for good, with a warning in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from .persample import Shift
from .persample.attention import seeded_attention
from .persample.local import math_attention

log = logging.getLogger(__name__)

#: per-row check tolerance relative to Σ|J|·|v|, by compute dtype (rounding of the dot products
#: and of two differently ordered evaluations; a wrong rule is off by O(1))
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 2e-3}


def rule_jacobian(
    side,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    xs: tuple[Tensor, ...],
    index: Tensor,
    width: int,
    shift: tuple[Tensor, Mapping[str, Tensor]] | None = None,
    *,
    weights: Tensor | None = None,
    groups: int = 1,
) -> dict[str, Tensor] | None:
    """{name: [m·O, *shape]} for the m inputs `xs` (at θ + s_j·Δθ when `shift` = (s, Δθ)),
    or None when the rules cannot treat this model (then the caller uses torch.func).

    With `groups` = G every row is evaluated G times — consecutive rows, input j's k-th at
    θ + s[j, k]·Δθ with its seed scaled by `weights`[j, k] (s and weights [m, G]) — and the G
    summed: Σ_k w_k J(x; θ + s_k·Δθ) over G quadrature nodes in one pass."""
    names = list(params)
    cap = side.fm.row_capture(names)
    if shift is not None and not cap.shiftable:
        return None
    m = int(xs[0].shape[0])
    ref = next(iter(params.values()))
    if not _seeded(
        cap, lambda: _seeded_pass(side, cap, params, buffers, xs, index, shift, weights, groups)
    ):
        _expanded_pass(side, cap, params, buffers, xs, index, width, shift, weights, groups)
    grads, failed = cap.gradients(groups)
    rest = [n for n in names if n in failed or n not in cap.covered]
    out = {
        n: grads[n] if n in grads else params[n].new_zeros(m * width, *params[n].shape)
        for n in names
    }
    if rest:  # torch.func on the m·G (input, group) pairs, then weighted and summed
        sub = {n: params[n] for n in rest}
        pairs = tuple(x.repeat_interleave(groups, 0) for x in xs)
        s = shift[0].reshape(-1) if shift is not None else None
        delta = shift[1] if shift is not None else None
        index_g = index.repeat_interleave(groups, 0)
        got = func_jacobian(side, sub, params, buffers, pairs, index_g, s, delta)
        w = weights.to(ref.dtype) if weights is not None else ref.new_ones(m, groups)
        for n, j in got.items():
            j = j.reshape(m, groups, width, -1) * w.reshape(m, groups, 1, 1)
            out[n] = j.sum(1).reshape(m * width, *params[n].shape)
    return out


def _seeded(cap, run: Callable[[], None]) -> bool:
    """Run a seeded pass (persample/seeds.py) where the model allows one; False (and the
    expanded pass from then on, for this model) when its backward cannot be batched."""
    if not cap.seeded:
        return False
    try:
        run()
        return True
    except (RuntimeError, NotImplementedError) as e:
        log.warning(
            "the test side's backward over all explained outputs at once failed on this model "
            "(%s); repeating each input once per explained output instead (slower, same "
            "rules and check)",
            e,
        )
        cap.seeded = False
        return False


def _seeded_pass(side, cap, params, buffers, xs, index, shift, weights, groups: int) -> None:
    """rule_jacobian's forward over the m·G (input, group) pairs, its backward seeded with the
    O explained outputs (attention by its math kernel, which the batched backward can vmap)."""
    ref = next(iter(params.values()))
    pairs = tuple(x.repeat_interleave(groups, 0) for x in xs)
    idx = index.repeat_interleave(groups, 0)
    sh = Shift(shift[0].to(ref.dtype).reshape(-1), shift[1]) if shift is not None else None
    base = int(idx.shape[0])
    with math_attention(), seeded_attention(), cap.capture(base, params, sh, seeded=True) as run:
        y = side.selector(side._call(run, buffers, pairs), idx)
        if weights is not None:
            y = y * weights.to(ref.dtype).reshape(-1, 1)
        cap.backward_seeded([y], groups)


def _expanded_pass(side, cap, params, buffers, xs, index, width, shift, weights, groups) -> None:
    """rule_jacobian's forward over every (input, output, group) row, one backward of the sum."""
    m = int(xs[0].shape[0])
    rows = m * width * groups
    ref = next(iter(params.values()))

    def per_row(t: Tensor) -> Tensor:  # [m, G] → [rows], row (j·O + o)·G + k
        return t.to(ref.dtype).reshape(m, 1, groups).expand(m, width, groups).reshape(-1)

    rep = tuple(x.repeat_interleave(width * groups, 0) for x in xs)
    idx = index.repeat_interleave(width * groups, 0)
    sh = Shift(per_row(shift[0]), shift[1]) if shift is not None else None
    pick = (torch.arange(rows, device=ref.device) // groups % width).unsqueeze(1)
    with cap.capture(rows, params, sh) as run:
        y = side.selector(side._call(run, buffers, rep), idx).gather(1, pick)
        if weights is not None:
            y = y * per_row(weights).unsqueeze(1)
        cap.backward(y.sum())


def points_jacobian(
    side,
    xs: tuple[Tensor, ...],
    index: Tensor,
    points: list[Mapping[str, Tensor]],
    weights: list[float],
    buffers: Mapping[str, Tensor],
    width: int,
) -> dict[str, Tensor] | None:
    """{name: [m·O, *shape]} Σ_k w_k ∂f/∂θ(θ_k) for the m inputs `xs`: one forward of all
    rows per point θ_k, one backward of Σ_k w_k·(explained sum at θ_k), each module's calls
    summed by its rule (persample/capture.py, `capture_points`), so no per-point Jacobian is
    ever written; None when the rules cannot treat the model."""
    names = list(points[0])
    cap = side.fm.row_capture(names)
    m = int(xs[0].shape[0])
    rows = m * width
    ref = next(iter(points[0].values()))

    def seeded() -> None:  # one forward of the m inputs per point, all outputs seeded at once
        with (
            math_attention(),
            seeded_attention(),
            cap.capture_points(m, points, seeded=True) as runs,
        ):
            ys = [
                side.selector(side._call(run, buffers, xs), index) * w
                for run, w in zip(runs, weights)
            ]
            cap.backward_seeded(ys)

    if not _seeded(cap, seeded):
        rep = tuple(x.repeat_interleave(width, 0) for x in xs)
        idx = index.repeat_interleave(width, 0)
        pick = (torch.arange(rows, device=ref.device) % width).unsqueeze(1)
        with cap.capture_points(rows, points) as runs:
            total = None
            for run, w in zip(runs, weights):
                y = side.selector(side._call(run, buffers, rep), idx).gather(1, pick).sum() * w
                total = y if total is None else total + y
            cap.backward(total)
    grads, failed = cap.gradients(merge=True)
    out = {n: grads[n] if n in grads else ref.new_zeros(rows, *points[0][n].shape) for n in names}
    rest = [n for n in names if n in failed or n not in cap.covered]
    if rest:  # torch.func at each point, weighted and summed
        acc: dict[str, Tensor] = {}
        for point, w in zip(points, weights):
            sub = {n: point[n] for n in rest}
            for n, j in func_jacobian(side, sub, point, buffers, xs, index).items():
                acc[n] = acc[n].add_(j, alpha=w) if n in acc else j * w
        out.update(acc)
    return out


def func_jacobian(side, sub, params, buffers, xs, index, s=None, delta=None) -> dict[str, Tensor]:
    """{name: [m·O, *shape]} for the parameters `sub` by vmap over inputs of jacrev."""
    fixed = {k: v for k, v in params.items() if k not in sub}
    selector = side.selector

    def single(p, sj, idx, *x1):
        point = {**fixed, **p}
        if delta is not None:
            point = {k: t + sj * delta[k] for k, t in point.items()}
        out = side._call(point, buffers, tuple(x.unsqueeze(0) for x in x1))
        return selector(out, idx.unsqueeze(0))[0]

    ref = next(iter(params.values()))
    sv = s if s is not None else torch.zeros(xs[0].shape[0], dtype=ref.dtype, device=ref.device)
    with math_attention():
        in_dims = (None, 0, 0) + (0,) * len(xs)
        jac = vmap(jacrev(single), in_dims=in_dims)(dict(sub), sv, index, *xs)
    return {k: v.reshape(-1, *params[k].shape) for k, v in jac.items()}


def reverse_jv(outputs, params: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> list:
    """J·v for each output tensor of `outputs(leaves)` by reverse-over-reverse autograd
    (d/du ⟨Jᵀu, v⟩), so the derivative has exactly autograd's semantics (an embedding's
    padding row, say); None for an output that does not depend on the parameters."""
    with torch.enable_grad(), math_attention():  # fused attention has no double backward
        leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        outs = outputs(leaves)
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        names = [k for k in leaves if k in v]
        g = torch.autograd.grad(
            outs, [leaves[k] for k in names], us, create_graph=True, allow_unused=True
        )
        total = None
        for k, gk in zip(names, g):
            if gk is not None:
                term = (gk * v[k]).sum()
                total = term if total is None else total + term
        if total is None or not total.requires_grad:
            return [None] * len(outs)
        return list(torch.autograd.grad(total, us, allow_unused=True))


def exact_jv(side, params, buffers, xs, index) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """v ↦ [m·O] ∂f/∂θ·v per row at θ (reverse-over-reverse on the chunk, one forward)."""

    def at(v: Mapping[str, Tensor]) -> Tensor:
        def outputs(leaves):
            return [side.selector(side._call(leaves, buffers, xs), index).reshape(-1)]

        (jv,) = reverse_jv(outputs, params, v)
        ref = next(iter(params.values()))
        n = int(xs[0].shape[0]) * side.width(params, buffers)
        return jv.detach() if jv is not None else ref.new_zeros(n)

    return at


#: rows_agree reads J in blocks of about this many bytes, so |J| is never written out whole
#: (on the p = 97 Transformer a whole |J| took 4/5 of the check's time)
CHECK_BLOCK_BYTES = 1 << 20


def rows_agree(jac: Mapping[str, Tensor], v: Mapping[str, Tensor], exact: Tensor) -> bool:
    """Whether J·v of the per-row Jacobians `jac` equals `exact` row by row."""
    got = torch.zeros_like(exact)
    scale = torch.zeros_like(exact)
    for k, j in jac.items():
        flat = j.reshape(j.shape[0], -1)
        vk = v[k].reshape(-1).to(flat.dtype)
        vabs = vk.abs()
        step = max(1, CHECK_BLOCK_BYTES // max(1, flat.shape[1] * flat.element_size()))
        for lo in range(0, flat.shape[0], step):
            block = flat[lo : lo + step]
            got[lo : lo + step] += block @ vk
            scale[lo : lo + step] += block.abs() @ vabs
    rtol = CHECK_RTOL.get(exact.dtype, 2e-3)
    tiny = torch.finfo(exact.dtype).tiny
    bad = (got - exact).abs() > rtol * (scale + exact.abs()) + tiny
    return not bool(bad.any())


def random_direction(params: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """A reproducible random direction (own generator: the global RNG is never touched)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {
        k: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
        for k, p in params.items()
    }
