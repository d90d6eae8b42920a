"""Test side: explained outputs f(x; θ) and their integrated Jacobian J̄_t along a step.

Rows are (test input, explained output) pairs, R = n·O. Per-row Jacobians come from the
per-layer rules of all rows in one pass — a step's nodes, kink pieces and kink probes too
(rowjac.py, node_pass.py, checked per row) —, else from torch.func (vmap over test inputs of
jacrev, eval mode), with a plain autograd fallback for models torch.func cannot transform."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jacrev, jvp, vmap

from .functional import FunctionalModel, OutputSelector
from .kinks import breakpoints, piece_nodes, record_switches
from .node_pass import node_pass, piece_pass, probe_pass
from .rowjac import (
    exact_jv,
    func_jacobian,
    math_attention,
    random_direction,
    rows_agree,
    rule_jacobian,
)
from .rules.base import row_dot
from .workmodel import clock_of

log = logging.getLogger(__name__)


class TestSide:
    """Explained outputs and Jacobians for one chunk of test inputs."""

    def __init__(
        self,
        fm: FunctionalModel,
        selector: OutputSelector,
        inputs: tuple[Tensor, ...],
        index: Tensor,
        *,
        keys: tuple[str | None, ...] | None = None,
        mode: str = "func",
        rules: bool = True,
        check_every: int = 16,
        fuse_nodes: bool = True,
    ) -> None:
        self.fm, self.selector, self.inputs, self.index = fm, selector, inputs, index
        self.keys = keys if keys is not None else (None,) * len(inputs)
        self.n = int(inputs[0].shape[0])
        self.mode = mode  # "func" (torch.func) or "autograd" (the plain fallback)
        self.rules = rules and mode == "func"  # per-row layer rules first (rowjac.py)
        self.check_every = max(1, int(check_every))
        self.fuse_nodes = fuse_nodes  # a step's nodes (kink pieces) in one pass: node_pass.py
        self._evals = 0
        self._width: int | None = None

    def _call(self, params, buffers, xs):
        """Run the model with `xs` split into positional and keyword inputs by `keys`."""
        args = tuple(x for k, x in zip(self.keys, xs) if k is None)
        kwargs = {k: x for k, x in zip(self.keys, xs) if k is not None}
        return self.fm(params, buffers, args, kwargs)

    @torch.no_grad()
    def values(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> Tensor:
        """[R] explained outputs at (θ, buffers), rows ordered (input, output)."""
        self.fm.set_modes(False)
        out = self._call(params, buffers, self.inputs)
        return self.selector(out, self.index).reshape(-1)

    def jacobian(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """{name: [R, *shape]} ∂f/∂θ at (θ, buffers)."""
        self.fm.set_modes(False)
        if self.rules:
            jac = self._rules(params, buffers, self.inputs, self.index, None)
            if jac is not None:
                return jac
        if self.mode == "func":
            try:
                return self._jacobian_func(params, buffers)
            except (RuntimeError, NotImplementedError) as e:
                log.warning("torch.func could not transform the model (%s); using autograd", e)
                self.mode = "autograd"
        return self._jacobian_autograd(params, buffers)

    def integrated_jacobian(
        self,
        theta: Mapping[str, Tensor],
        delta: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        nodes: np.ndarray,
        weights: np.ndarray,
        *,
        kink_splits: int = 0,
        kink_probes: int = 8,
    ) -> tuple[dict[str, Tensor], float]:
        """J̄ = Σ_k w_k ∂f/∂θ(θ + s_k·Δθ), and the Jacobian evaluations spent per test input.

        With `kink_splits` > 0 each test input's segment is first cut at up to that many kinks
        (kinks.py), located on a grid of `kink_probes` equal intervals (forward passes only),
        and the rule is applied on every piece, at that input's own nodes."""
        pieces = self._kink_pieces(theta, delta, buffers, nodes, weights, kink_splits, kink_probes)
        if pieces is not None:
            rows, s, w, fuse = *pieces, self.rules and self.fuse_nodes
            jac = piece_pass(self, theta, delta, buffers, rows, s, w) if fuse else None
            jac = jac if jac is not None else self._jacobian_at(theta, delta, buffers, rows, s, w)
            return jac, rows.size / self.n
        if self.rules and self.fuse_nodes:
            fused = node_pass(self, theta, delta, buffers, nodes, weights)
            if fused is not None:
                return fused, float(len(nodes))
        total: dict[str, Tensor] = {}
        for s, w in zip(nodes.tolist(), weights.tolist()):
            point = {k: theta[k] + s * delta[k] for k in theta}
            jac = self.jacobian(point, buffers)
            for k, v in jac.items():
                total[k] = total[k].add_(v, alpha=w) if k in total else v * w
        return total, float(len(nodes))

    def integrated_jvp(
        self,
        theta: Mapping[str, Tensor],
        delta: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        nodes: np.ndarray,
        weights: np.ndarray,
        *,
        kink_splits: int = 0,
        kink_probes: int = 8,
    ) -> tuple[Tensor, float]:
        """[R] J̄·Δθ at exactly the nodes `integrated_jacobian` uses, and the evaluations spent
        per test input. Forward mode: J(θ + sΔθ)·Δθ is d/ds f(θ + sΔθ), one JVP per node for
        all explained outputs at once, so measuring a rule costs a few forward passes where
        the Jacobian costs one backward per explained output."""
        pieces = self._kink_pieces(theta, delta, buffers, nodes, weights, kink_splits, kink_probes)
        if pieces is not None:
            rows, s, w = pieces
            return self._jvp_at(theta, delta, buffers, rows, s, w), rows.size / self.n
        self.fm.set_modes(False)
        total: Tensor | None = None
        for s, w in zip(nodes.tolist(), weights.tolist()):
            if self.mode == "func":
                try:
                    v = self._jvp_func(theta, delta, buffers, s)
                except (RuntimeError, NotImplementedError) as e:
                    log.warning("forward-mode AD failed on the model (%s); using autograd", e)
                    self.mode = "autograd"
            if self.mode == "autograd":
                point = {k: theta[k] + s * delta[k] for k in theta}
                jac = self._jacobian_autograd(point, buffers)
                v = sum(row_dot(jac[k], delta[k]) for k in theta)
            total = v * w if total is None else total.add_(v, alpha=w)
        assert total is not None, "a quadrature rule has at least one node"
        return total, float(len(nodes))

    def _jvp_func(self, theta, delta, buffers, s: float) -> Tensor:
        """[R] ∂f/∂θ(θ + sΔθ)·Δθ for the whole chunk: one forward with dual parameters
        (torch.autograd.forward_ad; a third of torch.func.jvp's fixed cost on small models)."""
        with fwAD.dual_level(), math_attention():
            point = {k: fwAD.make_dual(theta[k] + s * delta[k], delta[k]) for k in theta}
            out = self.selector(self._call(point, buffers, self.inputs), self.index).reshape(-1)
            primal, tangent = fwAD.unpack_dual(out)
            if tangent is None:  # f does not depend on θ along this direction
                tangent = torch.zeros_like(primal)
            return tangent.clone()

    def _jvp_at(self, theta, delta, buffers, rows, s, w) -> Tensor:
        """[R] Σ_j w_j ∂f/∂θ(θ + s_j·Δθ)·Δθ at test input rows[j], summed per input; pairs in
        blocks of n, like `_jacobian_at`."""
        self.fm.set_modes(False)
        ref = next(iter(theta.values()))
        total: Tensor | None = None
        selector = self.selector

        def single(sj, idx, *x1):
            def along(sv):
                point = {k: theta[k] + sv * delta[k] for k in theta}
                out = self._call(point, buffers, tuple(x.unsqueeze(0) for x in x1))
                return selector(out, idx.unsqueeze(0))[0]

            return jvp(along, (sj,), (torch.ones_like(sj),))[1]

        for lo in range(0, rows.size, self.n):
            r = torch.as_tensor(rows[lo : lo + self.n], device=ref.device)
            sb = torch.as_tensor(s[lo : lo + self.n], device=ref.device, dtype=ref.dtype)
            wb = torch.as_tensor(w[lo : lo + self.n], device=ref.device, dtype=ref.dtype)
            xs = tuple(x[r] for x in self.inputs)
            v: Tensor | None = None
            if self.mode == "func":
                try:
                    in_dims = (0, 0) + (0,) * len(xs)
                    with math_attention():
                        v = vmap(single, in_dims=in_dims)(sb, self.index[r], *xs)  # [m, O]
                except (RuntimeError, NotImplementedError) as e:
                    log.warning("torch.func could not transform the model (%s); using autograd", e)
                    self.mode = "autograd"
            if v is None:
                jac = self._jacobian_shifted(theta, delta, buffers, xs, self.index[r], sb)
                v = sum(row_dot(jac[k], delta[k]) for k in theta).reshape(r.numel(), -1)
            v = v.reshape(r.numel(), -1) * wb[:, None]
            if total is None:
                total = v.new_zeros(self.n, v.shape[1])
            total.index_add_(0, r, v)
        assert total is not None, "every test input has at least one node"
        return total.reshape(-1)

    def _kink_pieces(self, theta, delta, buffers, nodes, weights, limit: int, probes: int):
        """Flat (input, s, weight) arrays of the rule on every piece between each input's kinks,
        or None when splitting is off or no input has a kink on this segment."""
        if limit <= 0:
            return None
        cuts = self._kinks(theta, delta, buffers, limit, probes)
        if not any(c.size for c in cuts):
            return None
        return piece_nodes(cuts, nodes, weights)

    def _kinks(self, theta, delta, buffers, limit: int, probes: int) -> list[np.ndarray]:
        self.fm.set_modes(False)

        def at(s: float):
            point = {k: theta[k] + s * delta[k] for k in theta}
            return record_switches(
                lambda: self.selector(self._call(point, buffers, self.inputs), self.index), self.n
            )

        grid = np.linspace(0.0, 1.0, probes + 1).tolist()
        with clock_of(self.fm).phase("kinks"):  # all probes in one forward where it can
            fuse = self.rules and self.fuse_nodes  # rows that do not interact
            got = probe_pass(self, theta, delta, buffers, grid) if fuse else None
            return breakpoints(grid, got or [at(s) for s in grid], self.n, limit)

    def _jacobian_at(self, theta, delta, buffers, rows, s, w) -> dict[str, Tensor]:
        """Σ_j w_j ∂f/∂θ(θ + s_j·Δθ) at test input rows[j], summed per input: {name: [R, *shape]}.
        Pairs go through in blocks of n, so memory stays that of one whole-chunk evaluation."""
        self.fm.set_modes(False)
        ref = next(iter(theta.values()))
        total: dict[str, Tensor] = {}
        for lo in range(0, rows.size, self.n):
            r = torch.as_tensor(rows[lo : lo + self.n], device=ref.device)
            sb = torch.as_tensor(s[lo : lo + self.n], device=ref.device, dtype=ref.dtype)
            wb = torch.as_tensor(w[lo : lo + self.n], device=ref.device, dtype=ref.dtype)
            xs = tuple(x[r] for x in self.inputs)
            jac, weighted = None, False
            if self.rules:  # the weights ride on the seeds of the rules' backward
                jac = self._rules(theta, buffers, xs, self.index[r], (sb, delta), wb)
                weighted = jac is not None
            if jac is None:
                jac = self._jacobian_shifted(theta, delta, buffers, xs, self.index[r], sb)
            for k, v in jac.items():
                v = v.reshape(r.numel(), -1, *theta[k].shape)  # [m, O, *shape]
                if not weighted:
                    v = v * wb.reshape(-1, *([1] * (v.dim() - 1)))
                if k not in total:
                    total[k] = v.new_zeros(self.n, *v.shape[1:])
                total[k].index_add_(0, r, v)
        return {k: v.reshape(-1, *theta[k].shape) for k, v in total.items()}

    def _jacobian_shifted(self, theta, delta, buffers, xs, index, s) -> dict[str, Tensor]:
        """{name: [m·O, *shape]} ∂f/∂θ for input j of `xs` at θ + s_j·Δθ."""
        if self.rules:
            jac = self._rules(theta, buffers, xs, index, (s, delta))
            if jac is not None:
                return jac
        if self.mode == "func":
            selector = self.selector

            def single(p, sj, idx, *x1):
                point = {k: p[k] + sj * delta[k] for k in p}
                out = self._call(point, buffers, tuple(x.unsqueeze(0) for x in x1))
                return selector(out, idx.unsqueeze(0))[0]

            try:
                in_dims = (None, 0, 0) + (0,) * len(xs)
                with math_attention():
                    jac = vmap(jacrev(single), in_dims=in_dims)(dict(theta), s, index, *xs)
                return {k: v.reshape(-1, *theta[k].shape) for k, v in jac.items()}
            except (RuntimeError, NotImplementedError) as e:
                log.warning("torch.func could not transform the model (%s); using autograd", e)
                self.mode = "autograd"
        return self._autograd_at_points(theta, delta, buffers, xs, index, s)

    def _autograd_at_points(self, theta, delta, buffers, xs, index, s) -> dict[str, Tensor]:
        """{name: [m·O, *shape]} by plain autograd, input j at θ + s_j·Δθ, one at a time."""
        parts = []
        for j in range(int(s.numel())):
            one = TestSide(
                self.fm,
                self.selector,
                tuple(x[j : j + 1] for x in xs),
                index[j : j + 1],
                keys=self.keys,
                mode="autograd",
                rules=False,
            )
            point = {k: theta[k] + s[j] * delta[k] for k in theta}
            parts.append(one._jacobian_autograd(point, buffers))
        return {k: torch.cat([p[k] for p in parts], 0) for k in theta}

    def _point_reference(self, params, delta, buffers, xs, index, s) -> dict[str, Tensor]:
        """The check's reference at per-row points: torch.func, or autograd input by input
        for a model vmap cannot batch (data-dependent control flow, like Hugging Face's
        attention-mask handling)."""
        try:
            return func_jacobian(self, params, params, buffers, xs, index, s, delta)
        except (RuntimeError, NotImplementedError) as e:
            log.info("torch.func cannot batch the check (%s); autograd per input", e)
        return self._autograd_at_points(params, delta, buffers, xs, index, s)

    # ----------------------------------------------------------------- impls
    def width(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> int:
        """O: explained outputs per test input (one forward of the first input, cached)."""
        if self._width is None:
            with torch.no_grad():
                out = self._call(params, buffers, tuple(x[:1] for x in self.inputs))
                self._width = int(self.selector(out, self.index[:1]).shape[1])
        return self._width

    def _rules_hold(self, jac, params, buffers, xs, index, shift, weights=None) -> bool:
        """The per-row check: J·v along a random v equals autograd's, row by row (at θ); at
        per-row points, the first two inputs' rows equal torch.func's (or autograd's)."""
        v = random_direction(params, seed=self._evals)
        try:
            if shift is None:
                exact = exact_jv(self, params, buffers, xs, index)(v)
                ok = rows_agree(jac, v, exact)
            else:
                m = min(2, int(xs[0].shape[0]))
                rows = m * self.width(params, buffers)
                s, delta = shift
                sub = tuple(x[:m] for x in xs)
                ref = self._point_reference(params, delta, buffers, sub, index[:m], s[:m])
                exact = sum(r.reshape(rows, -1) @ v[k].reshape(-1) for k, r in ref.items())
                if weights is not None:  # the rules' rows carry their weights
                    exact = exact * weights[:m].repeat_interleave(rows // m)
                ok = rows_agree({k: j[:rows] for k, j in jac.items()}, v, exact)
        except (RuntimeError, NotImplementedError) as e:
            log.warning("the per-row rules could not be checked (%s); using torch.func", e)
            return False
        if not ok:
            log.warning(
                "per-row layer rules disagree with autograd on this model (rows interact, or "
                "a parameter is used outside its module's forward); using torch.func for the "
                "test side"
            )
        return ok

    def _rules(self, params, buffers, xs, index, shift, weights=None) -> dict[str, Tensor] | None:
        """Per-row rules (rowjac.py; rows scaled by `weights` [m] per input), checked per row
        every `check_every`-th call; None (and the torch.func route from then on) when they
        cannot treat the model or disagree."""
        width = self.width(params, buffers)
        try:
            jac = rule_jacobian(self, params, buffers, xs, index, width, shift, weights=weights)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            log.warning("per-row layer rules failed (%s); using torch.func", e)
            jac = None
        if jac is not None and self._evals % self.check_every == 0:
            ok = self._rules_hold(jac, params, buffers, xs, index, shift, weights)
            jac = jac if ok else None
        self._evals += 1
        if jac is None:
            self.rules = False
        return jac

    def _jacobian_func(self, params, buffers) -> dict[str, Tensor]:
        selector = self.selector

        def single(p, idx, *xs):
            out = self._call(p, buffers, tuple(x.unsqueeze(0) for x in xs))
            return selector(out, idx.unsqueeze(0))[0]

        in_dims = (None, 0) + (0,) * len(self.inputs)
        with math_attention():
            jac = vmap(jacrev(single), in_dims=in_dims)(dict(params), self.index, *self.inputs)
        return {k: v.reshape(-1, *params[k].shape) for k, v in jac.items()}

    def _jacobian_autograd(self, params, buffers) -> dict[str, Tensor]:
        names = list(params)
        rows: dict[str, list[Tensor]] = {k: [] for k in names}
        for i in range(self.n):
            leaf = {k: params[k].detach().requires_grad_(True) for k in names}
            with torch.enable_grad():
                out = self._call(leaf, buffers, tuple(x[i : i + 1] for x in self.inputs))
                y = self.selector(out, self.index[i : i + 1])[0]
                eye = torch.eye(y.numel(), dtype=y.dtype, device=y.device)
                grads = torch.autograd.grad(
                    y, [leaf[k] for k in names], eye, is_grads_batched=True, allow_unused=True
                )
            for k, g in zip(names, grads):
                rows[k].append(
                    g if g is not None else params[k].new_zeros(y.numel(), *params[k].shape)
                )
        return {k: torch.cat(v, 0) for k, v in rows.items()}
