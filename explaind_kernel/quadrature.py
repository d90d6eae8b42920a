"""Quadrature rules on [0, 1] for the path integral J̄_t = ∫₀¹ ∂f/∂θ(θ_t + s·Δθ_t) ds, and the
integration of one step with them.

A rule is a name plus a node count; `Quadrature.parse("gauss:2").points()` returns (nodes,
weights) as float64 numpy arrays. New rules register with `@register_quadrature("name")`.
`integrate` combines a rule, the kink pieces and adaptive bisection into J̄ for a chunk of
rows; the engine calls it and never branches on the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .functional import to_numpy64
from .rules.base import row_dot

if TYPE_CHECKING:
    from .jacobian import TestSide

RuleFn = Callable[[int], tuple[np.ndarray, np.ndarray]]
_RULES: dict[str, RuleFn] = {}


def register_quadrature(name: str) -> Callable[[RuleFn], RuleFn]:
    """Register `fn(n) -> (nodes, weights)` on [0, 1] under `name`."""

    def deco(fn: RuleFn) -> RuleFn:
        _RULES[name] = fn
        return fn

    return deco


@register_quadrature("gauss")
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre: exact for polynomials of degree 2n−1."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1.0) / 2.0, w / 2.0


@register_quadrature("midpoint")
def midpoint(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite midpoint rule (what upstream uses, with n = 100)."""
    return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)


@dataclass(frozen=True)
class Quadrature:
    """A named rule with a node count, e.g. Quadrature("gauss", 2)."""

    rule: str = "gauss"
    nodes: int = 2

    def __post_init__(self) -> None:
        if self.rule not in _RULES:
            raise InputError(
                f"unknown quadrature rule {self.rule!r}; registered rules: {sorted(_RULES)}. "
                "Register one with explaind_kernel.register_quadrature."
            )
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise InputError(f"quadrature nodes must be a positive integer, got {self.nodes!r}")

    @classmethod
    def parse(cls, spec: str | Quadrature) -> Quadrature:
        """Parse "gauss:2", "midpoint:100" or "gauss" (2 nodes)."""
        if isinstance(spec, Quadrature):
            return spec
        name, _, count = str(spec).partition(":")
        try:
            nodes = int(count) if count else 2
        except ValueError as e:
            raise InputError(
                f"cannot parse quadrature {spec!r}: expected RULE:NODES such as 'gauss:2'"
            ) from e
        return cls(name, nodes)

    def with_nodes(self, nodes: int) -> Quadrature:
        return Quadrature(self.rule, nodes)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(nodes, weights) on [0, 1], float64."""
        return _RULES[self.rule](self.nodes)

    def __str__(self) -> str:
        return f"{self.rule}:{self.nodes}"


def registered_rules() -> list[str]:
    """Names of the registered quadrature rules."""
    return sorted(_RULES)


# ------------------------------------------------------------------------ integration
@dataclass
class Integral:
    """J̄ of one chunk of rows over a whole step, by `integrate`.

    jbar:        {name: [R, *shape]} ∫₀¹ ∂f/∂θ(θ + sΔθ) ds by the rule (on every piece).
    components:  [R, n] J̄_n·Δθ_n per parameter tensor (in Δθ's order), float64, where the
                 adaptive refinement measured them; None: the caller takes them from its own
                 pass over J̄ (the optimizer rule's, adjoints.py).
    lin:         [R] J̄·Δθ, float64 (what the quadrature error is measured against), with
                 `components`; else None.
    evaluations: Jacobian evaluations spent, summed over the chunk's test inputs.
    """

    jbar: dict[str, Tensor]
    components: np.ndarray | None
    lin: np.ndarray | None
    evaluations: float


@dataclass
class _Piece:
    """J̄ over [a, b] of one test input's rows (adaptive refinement)."""

    a: float
    b: float
    fa: Tensor  # [O] f at θ + aΔθ
    fb: Tensor  # [O] f at θ + bΔθ
    jbar: dict[str, Tensor]  # {name: [O, *shape]}
    comps: np.ndarray  # [O, n]
    lin: np.ndarray  # [O]
    spent: float
    err: float  # max over the input's outputs of |Δf − J̄·Δθ| on [a, b]


def integrate(
    test: TestSide,
    theta: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    f_a: Tensor,
    f_b: Tensor,
    *,
    quadrature: Quadrature,
    subset: Callable[[Tensor], TestSide],
    kink_splits: int = 0,
    kink_probes: int = 8,
    adaptive_tol: float | None = None,
    max_nodes: int = 32,
) -> Integral:
    """J̄ of the step θ → θ + Δθ for every row of `test` (f_a, f_b: [R] f at both ends).

    The rule runs on the whole step (cut at each input's kinks when `kink_splits` > 0). With
    `adaptive_tol`, each test input is refined on its own: while the piece of its step with the
    largest measured error |Δf − J̄·Δθ| (exact: two forward passes) exceeds tol × its length,
    that piece is bisected, as long as the input's Jacobian evaluations in the step, kink
    pieces counted, stay within `max_nodes` (a split whose halves would pass it is dropped and
    the input stops refining). Decisions are per input, so a result does not depend on how the
    inputs are chunked.
    `subset(rows)` is the test side of the chunk's inputs `rows` (the order kept).
    """
    nodes, weights = quadrature.points()
    names = list(delta)
    args = (theta, delta, buffers, nodes, weights, names, kink_splits, kink_probes)
    if adaptive_tol is None:
        jbar, _, spent = _evaluate(test, 0.0, 1.0, *args, components=False)
        return Integral(jbar, None, None, float(round(spent * test.n)))
    n = test.n
    width = f_a.numel() // n
    if kink_splits > 0:  # evaluations differ per input: each input's pieces on its own
        per_input = [
            _pieces(subset(torch.tensor([i])), 0.0, 1.0, fa, fb, *args)[0]
            for i, (fa, fb) in enumerate(zip(f_a.reshape(n, -1), f_b.reshape(n, -1)))
        ]
    else:
        per_input = _pieces(test, 0.0, 1.0, f_a, f_b, *args)
    heaps = [[p] for p in per_input]
    evals = [p.spent for p in per_input]
    done = [False] * n  # an input whose next split would pass the budget stops refining
    while True:
        wanted: dict[tuple[float, float], list[tuple[int, _Piece]]] = {}
        for i, heap in enumerate(heaps):
            worst = max(heap, key=lambda p: p.err - adaptive_tol * (p.b - p.a))
            # the least a split costs: the rule once on each half (kink pieces add to that)
            cheapest = evals[i] - worst.spent + 2 * len(nodes)
            if done[i] or worst.err <= adaptive_tol * (worst.b - worst.a) or cheapest > max_nodes:
                continue
            heap.remove(worst)
            wanted.setdefault((worst.a, worst.b), []).append((i, worst))
        if not wanted:
            break
        for (a, b), group in wanted.items():
            # with kink splits, evaluations are counted per input, so inputs go one by one
            batches = [[g] for g in group] if kink_splits > 0 else [group]
            for batch in batches:
                side = subset(torch.tensor([i for i, _ in batch]))
                m = 0.5 * (a + b)
                fa = torch.stack([p.fa for _, p in batch]).reshape(-1)
                fb = torch.stack([p.fb for _, p in batch]).reshape(-1)
                fm = side.values({k: theta[k] + m * delta[k] for k in theta}, buffers)
                left = _pieces(side, a, m, fa, fm, *args)
                right = _pieces(side, m, b, fm, fb, *args)
                for j, (i, parent) in enumerate(batch):
                    cost = evals[i] - parent.spent + left[j].spent + right[j].spent
                    if cost > max_nodes:  # the halves hold more kink pieces than budgeted
                        heaps[i].append(parent)
                        done[i] = True
                        continue
                    heaps[i] += [left[j], right[j]]
                    evals[i] = cost
    total = {
        k: torch.zeros(f_a.numel(), *v.shape[1:], dtype=v.dtype, device=v.device)
        for k, v in heaps[0][0].jbar.items()
    }
    total_comps = np.zeros((f_a.numel(), len(names)))
    total_lin = np.zeros(f_a.numel())
    for i, heap in enumerate(heaps):
        rows = slice(i * width, (i + 1) * width)
        for p in sorted(heap, key=lambda p: p.a):
            for k, v in p.jbar.items():
                total[k][rows] += v
            total_comps[rows] += p.comps
            total_lin[rows] += p.lin
    return Integral(total, total_comps, total_lin, float(sum(evals)))


def _evaluate(
    test, a, b, theta, delta, buffers, nodes, weights, names, kinks, probes, *, components
):
    """(J̄ over [a, b] scaled to the whole step's Δθ, J̄_n·Δθ_n [R, n] float64 when
    `components` (else None), evaluations per input)."""
    # the whole step is the common case: no copies of θ and Δθ; the segment's length rides on
    # the weights instead of a pass over J̄ [R, P]
    start = theta if a == 0.0 else {k: theta[k] + a * delta[k] for k in theta}
    seg = delta if b - a == 1.0 else {k: (b - a) * delta[k] for k in delta}
    jb, spent = test.integrated_jacobian(
        start, seg, buffers, nodes, weights * (b - a), kink_splits=kinks, kink_probes=probes
    )
    if not components:
        return jb, None, spent
    comps = np.stack([to_numpy64(row_dot(jb[n], delta[n])) for n in names], 1)
    return jb, comps.reshape(-1, len(names)), spent


def _pieces(side, a, b, fa, fb, *args) -> list[_Piece]:
    """One `_Piece` per input of `side` for [a, b] (fa, fb: [m·O] f at the ends)."""
    jb, comps, spent = _evaluate(side, a, b, *args, components=True)
    m = side.n
    lin = comps.sum(1)
    fa, fb, lin = fa.reshape(m, -1), fb.reshape(m, -1), lin.reshape(m, -1)
    comps = comps.reshape(m, -1, comps.shape[-1])
    out = []
    for j in range(m):
        pj = {k: v.reshape(m, -1, *v.shape[1:])[j] for k, v in jb.items()}
        err = float(np.max(np.abs(to_numpy64(fb[j]) - to_numpy64(fa[j]) - lin[j])))
        out.append(_Piece(a, b, fa[j], fb[j], pj, comps[j], lin[j], spent, err))
    return out
