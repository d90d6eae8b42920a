"""Test side: explained outputs f(x; θ) and their integrated Jacobian J̄_t along a step.

Rows are (test input, explained output) pairs, R = n·O. Per-sample Jacobians come from
torch.func (vmap over test inputs of jacrev of a single-input call, eval mode), with a plain
autograd fallback for models torch.func cannot transform.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev, vmap

from .functional import FunctionalModel, OutputSelector

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
    ) -> None:
        self.fm, self.selector, self.inputs, self.index = fm, selector, inputs, index
        self.keys = keys if keys is not None else (None,) * len(inputs)
        self.n = int(inputs[0].shape[0])
        self.mode = mode

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
    ) -> dict[str, Tensor]:
        """J̄ = Σ_k w_k ∂f/∂θ(θ + s_k·Δθ)."""
        total: dict[str, Tensor] = {}
        for s, w in zip(nodes.tolist(), weights.tolist()):
            point = {k: theta[k] + s * delta[k] for k in theta}
            jac = self.jacobian(point, buffers)
            for k, v in jac.items():
                total[k] = total[k].add_(v, alpha=w) if k in total else v.mul_(w)
        return total

    # ----------------------------------------------------------------- impls
    def _jacobian_func(self, params, buffers) -> dict[str, Tensor]:
        selector = self.selector

        def single(p, idx, *xs):
            out = self._call(p, buffers, tuple(x.unsqueeze(0) for x in xs))
            return selector(out, idx.unsqueeze(0))[0]

        in_dims = (None, 0) + (0,) * len(self.inputs)
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
