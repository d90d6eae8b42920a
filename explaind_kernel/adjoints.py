"""The adjoints of one chunk of rows over a flat parameter layout.

Every parameter tensor of the model lies side by side on one axis of P entries (`FlatLayout`,
the trace's parameter order), so the carried adjoint of all tensors is one contiguous [R, P]
buffer with per-tensor views. A rule that gives its step as elementwise coefficients
(rules/base.py's `LinearStep`: λ = carry + a⊙J̄, z = c·λ + e·J̄, carry ← f·λ) runs on every
tensor at once in `FlatAdjoints`, which keeps the carry as σ ⊙ C with a per-tensor scale σ,
so that a step reads J̄ once for its update and once for its per-row terms:

    C ← C + (a/σ) ⊙ J̄      (then λ = σ⊙C,  z = (cσ)⊙C + e⊙J̄,  carry = (fσ)⊙C: σ ← fσ)

in place on C's views of J̄'s own tensors (the test side hands J̄ over tensor by tensor, and
copying it into one buffer would cost two more passes and a copy), one matrix product for the
terms on C, C·[cσ⊙g, cσ⊙w, fσ⊙m₀], and one per tensor on J̄, J̄_n·[Δθ_n, Δθ_n − Δθ̂_n, u_n,
e⊙g_n, e⊙w_n] (the per-tensor components come from the same pass). The training side
contracts C's views and scales its products by cσ when that is one number for every tensor with
a gradient (else, and with nesterov, z is written out into its own buffer). σ is folded back
into C when it leaves [1e-12, 1e12], and a dropped carry (f = 0, or no carry into a step)
restarts its span.

A rule that is not elementwise-linear (it overrides `backward`) runs tensor by tensor in
`TensorAdjoints`, with the same per-row terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .functional import to_numpy64
from .rules.base import LinearStep, OptimizerRule, ParamStep, row_dot, row_products

#: the range of the carry's scale σ outside which it is folded back into the buffer
_SIGMA_RANGE = (1e-12, 1e12)


class FlatLayout:
    """Parameter tensors `names` laid side by side on one axis of `size` entries."""

    def __init__(self, names: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> None:
        self.names = tuple(names)
        self.shapes = {n: tuple(int(s) for s in shapes[n]) for n in self.names}
        self.spans: dict[str, slice] = {}
        at = 0
        for n in self.names:
            size = int(np.prod(self.shapes[n]))
            self.spans[n] = slice(at, at + size)
            at += size
        self.size = at
        self.sizes = [s.stop - s.start for s in self.spans.values()]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """{name: [*lead, *shape]} views into `flat` [*lead, size] (no copy)."""
        lead = tuple(flat.shape[:-1])
        return {n: flat[..., self.spans[n]].view(*lead, *self.shapes[n]) for n in self.names}

    def flatten(self, tensors: Mapping[str, Tensor | None], like: Tensor) -> Tensor:
        """[size] one [*shape] tensor per name laid flat (zeros where one is absent or None),
        in the dtype and on the device of `like`."""
        parts = []
        for n, size in zip(self.names, self.sizes):
            v = tensors.get(n)
            parts.append(like.new_zeros(size) if v is None else v.reshape(-1).to(like.dtype))
        return torch.cat(parts)

    def spread(self, values: Sequence[float], like: Tensor) -> Tensor | float:
        """One float per tensor laid flat ([size]), or the float itself when all are equal."""
        if len(set(values)) <= 1:
            return float(values[0]) if values else 0.0
        per = torch.tensor([float(v) for v in values], dtype=like.dtype)
        return torch.repeat_interleave(per, torch.tensor(self.sizes)).to(like.device)


@dataclass
class StepTerms:
    """Per-row terms of one step ([R] float64 each) and the adjoints Z_τ to contract with."""

    z_grad: dict[str, Tensor]  # {name: [R, *shape]}: Z_τ = z_scale · z_grad
    z_scale: float
    weight_decay: np.ndarray
    total_g: np.ndarray  # ⟨Z_τ, g_τ⟩: all that reached the gradient (data + non-data)
    initial_state: np.ndarray
    residual: np.ndarray
    components: np.ndarray | None = None  # [R, tensors] J̄_n·Δθ_n, when asked for


def make_adjoints(
    rule: OptimizerRule,
    layout: FlatLayout,
    rows: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    carry_in: Mapping[str, Tensor | None] | None = None,
) -> FlatAdjoints | TensorAdjoints:
    """The adjoint state of a chunk: flat for a rule with `linear`, else tensor by tensor."""
    cls = TensorAdjoints if type(rule).linear is OptimizerRule.linear else FlatAdjoints
    return cls(layout, rows, dtype=dtype, device=device, carry_in=carry_in)


class _Adjoints:
    def __init__(self, layout: FlatLayout, rows: int, *, dtype, device, carry_in=None) -> None:
        self.layout, self.rows = layout, rows
        self.like = torch.zeros((), dtype=dtype, device=device)
        self.carry_in = {n: v for n, v in (carry_in or {}).items() if v is not None}


class FlatAdjoints(_Adjoints):
    """The carried adjoint of R rows as σ ⊙ C, C one [R, P] buffer (see the module doc)."""

    def __init__(self, layout: FlatLayout, rows: int, *, dtype, device, carry_in=None) -> None:
        super().__init__(layout, rows, dtype=dtype, device=device, carry_in=carry_in)
        self.c = self.like.new_zeros(rows, layout.size)
        self._views = layout.views(self.c)
        self.sigma = dict.fromkeys(layout.names, 1.0)
        self.live = dict.fromkeys(layout.names, False)  # False: the carry is zero
        for n, v in self.carry_in.items():
            self._views[n].copy_(v)
            self.live[n] = True
        self._zbuf: Tensor | None = None

    def carried(self) -> dict[str, Tensor | None]:
        """{name: [R, *shape]} the adjoint carried out of the last step (None: zero): views
        of the buffer, the scale folded into it first (in place)."""
        for n in self.layout.names:
            if self.live[n] and self.sigma[n] != 1.0:
                self._views[n].mul_(self.sigma[n])
                self.sigma[n] = 1.0
        return {n: (self._views[n] if self.live[n] else None) for n in self.layout.names}

    def step(
        self,
        rule: OptimizerRule,
        steps: Sequence[ParamStep],
        jbar: Mapping[str, Tensor] | None,
        *,
        terms: bool = True,
        initial: bool = False,
        components: bool = False,
    ) -> StepTerms | None:
        """Step t backward for every tensor (`steps`: one per name, in layout order; `jbar`:
        {name: [R, *shape]} J̄, None for J̄ = 0). `terms=False` only carries the adjoint (the
        sharded scan); `initial`: the trace's first step (the initial-state term);
        `components`: also J̄_n·Δθ_n per tensor (from the same pass over J̄)."""
        lins: list[LinearStep] = [rule.linear(p) for p in steps]  # type: ignore[misc]
        names, layout, like = self.layout.names, self.layout, self.like
        live_before = dict(self.live)
        # no carry into this step (none yet, a dropped one, or the rule takes none): restart
        # the span at zero with σ = 1 (a skipped tensor keeps its carry as it is)
        restart = [
            n
            for n, lin in zip(names, lins)
            if not lin.skipped and (not lin.carry_in or not self.live[n] or self.sigma[n] == 0.0)
        ]
        for n in restart:
            self.sigma[n] = 1.0
            self.live[n] = False
        if jbar is not None:  # C ← C + (a/σ) ⊙ J̄, tensor by tensor on J̄'s own tensors
            fresh = set(restart)
            for n, lin in zip(names, lins):
                if lin.skipped:
                    continue
                view, jb = self._views[n], jbar[n]
                if n in fresh:
                    torch.mul(jb, lin.a, out=view)
                elif isinstance(lin.a, Tensor):
                    view.addcmul_(jb, lin.a if self.sigma[n] == 1.0 else lin.a / self.sigma[n])
                else:
                    view.add_(jb, alpha=lin.a / self.sigma[n])
                self.live[n] = True
        out = None
        if terms:  # λ = σ ⊙ C on the live spans, zero elsewhere
            out = self._terms(rule, steps, lins, jbar, live_before, initial, components)
        for n, lin in zip(names, lins):  # carry ← f ⊙ λ
            if not lin.skipped:
                self.sigma[n] *= lin.f if lin.f is not None else 0.0
                self.live[n] = self.live[n] and self.sigma[n] != 0.0
        lo, hi = _SIGMA_RANGE
        if any(self.live[n] and not lo <= abs(self.sigma[n]) <= hi for n in names):
            self.c.mul_(layout.spread([self.sigma[n] for n in names], like))
            self.sigma = dict.fromkeys(names, 1.0)
        return out

    def _terms(self, rule, steps, lins, jbar, live_before, initial, comps) -> StepTerms:
        """Per-row terms: C·[cσ⊙g, cσ⊙w, fσ⊙m₀] (one product) and J̄_n·[Δθ_n, Δθ_n − Δθ̂_n, u_n,
        e⊙g_n, e⊙w_n] (one product per tensor: one pass over J̄)."""
        layout, like, names = self.layout, self.like, self.layout.names
        # the tensors the step moves (their λ = σ ⊙ C), and those of them with a gradient,
        # whose Z is contracted (J̄ = 0: only the tensors that carried an adjoint in)
        moving = {
            n
            for n, lin in zip(names, lins)
            if not lin.skipped and self.live[n] and (jbar is not None or live_before[n])
        }
        act = {p.name for p in steps if p.name in moving and p.grad is not None}
        sig = [self.sigma[n] if self.live[n] else 0.0 for n in names]
        cs = [lin.c * s if n in moving else 0.0 for n, lin, s in zip(names, lins, sig)]
        scale = layout.spread(cs, like)
        g = layout.flatten({p.name: p.grad for p in steps if p.name in act}, like)
        w = _optional(layout, [lin.w for lin in lins], like)
        ccols = [g * scale] + ([w * scale] if w is not None else [])
        key = rule.state_key
        init = None
        if initial and key is not None:  # ⟨carry out, m₀⟩ with carry out = fσ ⊙ C
            m0 = {p.name: p.state_before.get(key) for p in steps}
            m0 = {n: v for n, v in m0.items() if isinstance(v, Tensor)}
            fs = [s * (1.0 if lin.skipped else (lin.f or 0.0)) for lin, s in zip(lins, sig)]
            init = layout.flatten(m0, like) * layout.spread(fs, like)
            ccols.append(init)
        got = to_numpy64(row_products(self.c, torch.stack(ccols, 1))).T
        cols = iter(got)
        zero = np.zeros(self.rows)
        total_g = next(cols)
        wd = next(cols) if w is not None else zero
        init_t = next(cols) if init is not None else zero
        residual, per_tensor = zero, None
        nesterov = any(lin.e != 0.0 for n, lin in zip(names, lins) if n in moving)
        if jbar is not None:
            # the columns laid flat once; each tensor's product reads its span (a view)
            delta = layout.flatten({p.name: p.delta for p in steps}, like)
            recon = layout.flatten({n: lin.recon for n, lin in zip(names, lins)}, like)
            jcols = ([delta] if comps else []) + [delta - recon]
            u = _optional(layout, [lin.u for lin in lins], like)
            if u is not None:
                jcols.append(u)
            if nesterov:
                e = layout.spread(
                    [lin.e if n in moving else 0.0 for n, lin in zip(names, lins)], like
                )
                jcols += [g * e] + ([w * e] if w is not None else [])
            m = torch.stack(jcols, 1)
            spans = layout.spans
            prods = [row_products(jbar[n].reshape(self.rows, -1), m[spans[n]]) for n in names]
            got_j = to_numpy64(torch.stack(prods))  # [tensors, R, columns]
            if comps:
                per_tensor, got_j = got_j[:, :, 0].T.copy(), got_j[:, :, 1:]
            jcol = iter(got_j.sum(0).T)
            residual = next(jcol)
            if u is not None:
                wd = wd + next(jcol)
            if nesterov:
                total_g = total_g + next(jcol)
                if w is not None:
                    wd = wd + next(jcol)
        z_grad, z_scale = self._z(names, lins, cs, act, jbar, nesterov)
        return StepTerms(z_grad, z_scale, wd, total_g, init_t, residual, per_tensor)

    def _z(self, names, lins, cs, act, jbar, nesterov) -> tuple[dict[str, Tensor], float]:
        """Z of the tensors with a gradient: C's views and one scale cσ, or written out."""
        used = {cs[i] for i, n in enumerate(names) if n in act}
        if len(used) <= 1 and not (nesterov and jbar is not None):
            return {n: self._views[n] for n in names if n in act}, (used.pop() if used else 1.0)
        if self._zbuf is None:
            self._zbuf = torch.empty_like(self.c)
        torch.mul(self.c, self.layout.spread(cs, self.like), out=self._zbuf)
        views = self.layout.views(self._zbuf)
        if nesterov and jbar is not None:  # + e ⊙ J̄, on J̄'s own tensors
            for n, lin in zip(names, lins):
                if n in act and lin.e != 0.0:
                    views[n].add_(jbar[n], alpha=lin.e)
        return {n: views[n] for n in names if n in act}, 1.0


def _optional(layout: FlatLayout, values: list[Tensor | None], like: Tensor) -> Tensor | None:
    if all(v is None for v in values):
        return None
    return layout.flatten(dict(zip(layout.names, values)), like)


class TensorAdjoints(_Adjoints):
    """The carried adjoint tensor by tensor, for a rule that overrides `backward`."""

    def __init__(self, layout: FlatLayout, rows: int, *, dtype, device, carry_in=None) -> None:
        super().__init__(layout, rows, dtype=dtype, device=device, carry_in=carry_in)
        self.carry: dict[str, Tensor | None] = dict.fromkeys(layout.names)
        self.carry.update({n: v.clone() for n, v in self.carry_in.items()})

    def carried(self) -> dict[str, Tensor | None]:
        """{name: [R, *shape]} the adjoint carried out of the last step (None: zero)."""
        return dict(self.carry)

    def step(
        self, rule, steps, jbar, *, terms=True, initial=False, components=False
    ) -> StepTerms | None:
        """As `FlatAdjoints.step`, by `rule.backward` on each tensor."""
        z_grad: dict[str, Tensor] = {}
        wd, total_g, init, residual = (np.zeros(self.rows) for _ in range(4))
        comps = np.zeros((self.rows, len(steps))) if components else None
        for i, p in enumerate(steps):
            n = p.name
            if jbar is None and self.carry[n] is None:
                continue
            jb = jbar[n] if jbar is not None else self.like.new_zeros(self.rows, *p.theta.shape)
            q = ParamStep(n, jb, p.theta, p.delta, p.grad, p.hp, p.state_before, p.state_after)
            out = rule.backward(q, self.carry[n])
            self.carry[n] = out.carry
            if not terms:
                continue
            wd += to_numpy64(out.weight_decay)
            if jbar is not None:
                residual += to_numpy64(row_dot(jb, p.delta - out.recon))
                if comps is not None:
                    comps[:, i] = to_numpy64(row_dot(jb, p.delta))
            if out.z_grad is not None and p.grad is not None:
                z_grad[n] = out.z_grad
                total_g += to_numpy64(row_dot(out.z_grad, p.grad))
            if initial:
                init += to_numpy64(
                    rule.initial_state_term(out.carry, p.state_before, self.rows, jb)
                )
        return StepTerms(z_grad, 1.0, wd, total_g, init, residual, comps) if terms else None


def slice_components(
    jbar: Mapping[str, Tensor], delta: Mapping[str, Tensor], slices: Mapping
) -> list[Tensor]:
    """[R] J̄·(mask ⊙ Δθ) of each slice (pname, mask)."""
    return [row_dot(jbar[p], mask * delta[p]) for p, mask in slices.values()]


__all__ = [
    "FlatAdjoints",
    "FlatLayout",
    "StepTerms",
    "TensorAdjoints",
    "make_adjoints",
    "slice_components",
]
