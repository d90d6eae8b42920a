"""Training side: per-sample kernel values K(x; i, τ) = c_{i,τ} · (J(x_i; θ_τ) Z_τ).

Each recorded forward is replayed *batched* at θ_τ with the recorded RNG state, module modes and
buffers, so dropout masks and batch-norm batch statistics are those of training. Per-sample
gradients G_i = J(x_i)ᵀ c_i come from one backward pass vmapped over one-hot row cotangents
(`is_grads_batched`), in blocks of rows so memory stays at block × parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError
from .functional import FunctionalModel, tree_leaves, tree_to

log = logging.getLogger(__name__)


@dataclass
class ForwardProducts:
    """Kernel values of one recorded forward pass."""

    k: Tensor  # [B, R] per batch row
    k_param: dict[str, Tensor] | None  # {param: [B, R]} per parameter tensor (when asked)
    grad_sum: dict[str, Tensor]  # Σ_i G_i per parameter tensor (for slices and checks)


def _restore_rng(cpu_state: Tensor, cuda_state: Tensor | None, device: torch.device) -> None:
    torch.set_rng_state(cpu_state)
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


class TrainingSide:
    """Replays recorded training forwards and contracts per-sample gradients with Z_τ."""

    def __init__(self, fm: FunctionalModel, *, block_rows: int = 64) -> None:
        self.fm = fm
        self.block_rows = max(1, int(block_rows))
        self._batched_ok = True

    def products(
        self,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        forward,  # explaind_trace.ForwardRecord
        z_grad: Mapping[str, Tensor],
        *,
        per_param: bool,
    ) -> ForwardProducts:
        """K for every batch row of `forward` against the adjoints `z_grad` ({name: [R, *shape]})."""
        fm = self.fm
        device, dtype = fm.device, fm.dtype
        names = [n for n in z_grad]
        leaves_p = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        other = {n: params[n] for n in params if n not in z_grad}
        bufs = {k: v.clone() for k, v in buffers.items()}
        args = tree_to(tuple(forward.args), device, dtype)
        kwargs = tree_to(dict(forward.kwargs), device, dtype)

        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        fm.set_modes(bool(forward.training), getattr(forward, "mode_overrides", None))
        try:
            _restore_rng(forward.rng_state, getattr(forward, "cuda_rng_state", None), device)
            with torch.enable_grad():
                out = fm({**leaves_p, **other}, bufs, args, kwargs)
        finally:
            _restore_rng(saved_cpu, saved_cuda, device)
            fm.set_modes(False)

        outs = tree_leaves(out)
        cots = tree_leaves(tree_to(forward.cotangent, device, dtype))
        if len(outs) != len(cots):
            raise InputError(
                f"the replayed output has {len(outs)} tensors but the trace recorded "
                f"{len(cots)} cotangents; pass a model of the traced architecture."
            )
        pairs = [(o, c) for o, c in zip(outs, cots) if c is not None and o is not None]
        batch = len(forward.ids)
        rows = next(iter(z_grad.values())).shape[0] if z_grad else 0
        k = torch.zeros(batch, rows, dtype=dtype, device=device)
        k_param = {n: torch.zeros(batch, rows, dtype=dtype, device=device) for n in names} if per_param else None
        grad_sum = {n: torch.zeros_like(leaves_p[n]) for n in names}
        plist = [leaves_p[n] for n in names]
        zflat = {n: z_grad[n].reshape(rows, -1) for n in names}

        for start in range(0, batch, self.block_rows):
            stop = min(batch, start + self.block_rows)
            grads = self._block_grads(pairs, plist, start, stop)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                g = g.reshape(stop - start, -1)
                kn = g @ zflat[n].T
                k[start:stop] += kn
                if k_param is not None:
                    k_param[n][start:stop] = kn
                grad_sum[n] += g.sum(0).reshape(grad_sum[n].shape)
        return ForwardProducts(k, k_param, grad_sum)

    def _block_grads(self, pairs, plist, start: int, stop: int) -> list[Tensor | None]:
        """Per-sample gradients of rows [start, stop): list over params of [b, *shape]."""
        b = stop - start
        if self._batched_ok:
            try:
                grad_outputs = []
                for o, c in pairs:
                    e = torch.zeros((b,) + tuple(o.shape), dtype=o.dtype, device=o.device)
                    idx = torch.arange(b, device=o.device)
                    e[idx, idx + start] = c[start:stop].to(o.dtype)
                    grad_outputs.append(e)
                return list(
                    torch.autograd.grad(
                        [o for o, _ in pairs],
                        plist,
                        grad_outputs,
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                )
            except RuntimeError as e:
                log.warning("batched per-sample gradients failed (%s); looping over rows", e)
                self._batched_ok = False
        per_row: list[list[Tensor | None]] = []
        for r in range(start, stop):
            grad_outputs = []
            for o, c in pairs:
                e = torch.zeros_like(o)
                e[r] = c[r].to(o.dtype)
                grad_outputs.append(e)
            per_row.append(
                list(
                    torch.autograd.grad(
                        [o for o, _ in pairs], plist, grad_outputs, retain_graph=True, allow_unused=True
                    )
                )
            )
        out: list[Tensor | None] = []
        for j, p in enumerate(plist):
            col = [row[j] for row in per_row]
            out.append(None if all(g is None for g in col) else torch.stack([g if g is not None else torch.zeros_like(p) for g in col]))
        return out
