"""Training side: per-sample kernel values K(x; i, τ) = c_{i,τ} · (J(x_i; θ_τ) Z_τ).

Each recorded forward is replayed *batched* at θ_τ with the recorded RNG state, module modes and
buffers, so dropout masks and batch-norm batch statistics are those of training. Two routes give
the same numbers (tested against each other):

* "per_sample": G_i = J(x_i)ᵀ c_i from one backward vmapped over one-hot row cotangents
  (`is_grads_batched`), in blocks of rows (memory block × parameters); then K = G·Zᵀ. Costs one
  full-batch backward per batch row, O(B²), but splits K by parameter tensor for free.
* "jvp": the batch's output tangents along each adjoint row, J·Z_r, by the double-backward
  trick (d/du ⟨Jᵀu, Z_r⟩ = J·Z_r, which works in train mode with batch norm and dropout); then
  K[:, r] = c · (J·Z_r). Costs O(R) passes for R explained rows and no B × P memory.

* "vmap": per-sample gradients by torch.func.vmap over the batch rows (one batch backward's
  cost), exact only when samples do not interact and nothing random runs in the forward: vmap
  itself refuses dropout and train-mode batch norm, and each forward is also checked — Σ_i G_i
  must equal the batched Jᵀc — else the run falls back to a batched route.

"auto" tries "vmap", and otherwise takes "jvp" when 3·R < B and no per-parameter split is
asked for, else "per_sample".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import vmap

from .errors import InputError
from .functional import FunctionalModel, tree_leaves, tree_to

log = logging.getLogger(__name__)


@dataclass
class ForwardProducts:
    """Kernel values of one recorded forward pass."""

    k: Tensor  # [B, R] per batch row
    k_param: dict[str, Tensor] | None  # {param: [B, R]} per parameter tensor (when asked)
    grad_sum: dict[str, Tensor]  # Σ_i G_i per parameter tensor (for slices and checks)


@dataclass
class _Replayed:
    """One recorded forward replayed batched at θ_τ (the graph is kept for the routes)."""

    forward: Any
    names: list[str]
    leaves: dict[str, Tensor]  # parameters that get adjoints, requiring grad
    other: dict[str, Tensor]
    bufs: dict[str, Tensor]
    args: tuple
    kwargs: dict[str, Any]
    pairs: list[tuple[Tensor, Tensor]]  # (output leaf, its recorded cotangent)
    batch: int
    rows: int


def _restore_rng(cpu_state: Tensor, cuda_state: Tensor | None, device: torch.device) -> None:
    torch.set_rng_state(cpu_state)
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


class TrainingSide:
    """Replays recorded training forwards and contracts per-sample gradients with Z_τ."""

    def __init__(self, fm: FunctionalModel, *, block_rows: int = 64, mode: str = "auto") -> None:
        if mode not in ("auto", "per_sample", "jvp", "vmap"):
            raise InputError(
                f"training_mode must be 'auto', 'per_sample', 'jvp' or 'vmap', got {mode!r}"
            )
        self.fm = fm
        self.block_rows = max(1, int(block_rows))
        self.mode = mode
        self._batched_ok = True
        self._vmap_ok = mode in ("auto", "vmap")

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
        replayed = _Replayed(
            forward, names, leaves_p, other, bufs, args, kwargs, pairs, batch, rows
        )
        mode = self.mode
        if mode in ("auto", "vmap") and self._vmap_ok:
            got = self._try_vmap(replayed, z_grad, per_param)
            if got is not None:
                return got
        if mode in ("auto", "vmap"):
            mode = "jvp" if (3 * rows < batch and not per_param) else "per_sample"
        if mode == "jvp" and not per_param:
            with torch.enable_grad():  # the sweep runs under no_grad; tangents need a graph
                return self._jvp_products(pairs, names, leaves_p, z_grad, batch, rows)
        k = torch.zeros(batch, rows, dtype=dtype, device=device)
        k_param = (
            {n: torch.zeros(batch, rows, dtype=dtype, device=device) for n in names}
            if per_param
            else None
        )
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

    def _try_vmap(self, r: _Replayed, z_grad, per_param: bool):
        """Per-sample gradients by vmap over batch rows; None (and never again) when not exact."""
        pairs, names, leaves_p, other, bufs = r.pairs, r.names, r.leaves, r.other, r.bufs
        args, kwargs, forward, batch, rows = r.args, r.kwargs, r.forward, r.batch, r.rows
        fm = self.fm
        plist = [leaves_p[n] for n in names]
        outs = [o for o, _ in pairs]
        cots_all = tree_leaves(tree_to(forward.cotangent, fm.device, fm.dtype))
        with torch.enable_grad():
            ref = torch.autograd.grad(
                outs, plist, [c.to(o.dtype) for o, c in pairs], retain_graph=True, allow_unused=True
            )
        detached = {n: leaves_p[n].detach() for n in names}

        def batched(x):
            return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch

        flat_args = list(args)
        kw_names = list(kwargs)
        flat = flat_args + [kwargs[k] for k in kw_names]
        dims = tuple(0 if batched(x) else None for x in flat)
        cot_dims = tuple(0 if (c is not None and batched(c)) else None for c in cots_all)
        if any(d is None for c, d in zip(cots_all, cot_dims) if c is not None):
            self._vmap_ok = False
            return None

        def loss_one(p, xs, cs):
            xs = [x.unsqueeze(0) if d == 0 else x for x, d in zip(xs, dims)]
            a, kw = xs[: len(flat_args)], dict(zip(kw_names, xs[len(flat_args) :]))
            out = fm({**p, **other}, bufs, tuple(a), kw)
            total = 0.0
            for o, c in zip(tree_leaves(out), cs):
                if c is not None and o is not None:
                    total = total + (o[0] * c).sum()
            return total

        fm.set_modes(bool(forward.training), getattr(forward, "mode_overrides", None))
        try:
            per = vmap(func_grad(loss_one), in_dims=(None, list(dims), list(cot_dims)))
            k = torch.zeros(batch, rows, dtype=fm.dtype, device=fm.device)
            k_param = (
                {n: torch.zeros(batch, rows, dtype=fm.dtype, device=fm.device) for n in names}
                if per_param
                else None
            )
            grad_sum = {n: torch.zeros_like(detached[n]) for n in names}
            zflat = {n: z_grad[n].reshape(rows, -1) for n in names}
            for start in range(0, batch, self.block_rows):
                stop = min(batch, start + self.block_rows)
                xs = [x[start:stop] if d == 0 else x for x, d in zip(flat, dims)]
                cs = [c[start:stop] if c is not None else None for c in cots_all]
                g = per(detached, xs, cs)
                for n in names:
                    gn = g[n].reshape(stop - start, -1)
                    kn = gn @ zflat[n].T
                    k[start:stop] += kn
                    if k_param is not None:
                        k_param[n][start:stop] = kn
                    grad_sum[n] += gn.sum(0).reshape(grad_sum[n].shape)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            log.info(
                "vmap per-sample gradients unavailable (%s); using batched replay",
                str(e).splitlines()[0],
            )
            self._vmap_ok = False
            return None
        finally:
            fm.set_modes(False)
        for n, r in zip(names, ref):
            r = torch.zeros_like(grad_sum[n]) if r is None else r
            scale = float(r.abs().max()) if r.numel() else 0.0
            tol = (1e-3 if fm.dtype == torch.float32 else 1e-9) * max(scale, 1e-30)
            if float((grad_sum[n] - r).abs().max()) > tol:
                log.warning(
                    "per-sample gradients by vmap do not add up to the batch gradient of %s "
                    "(samples interact in the forward); using batched replay",
                    n,
                )
                self._vmap_ok = False
                return None
        return ForwardProducts(k, k_param, grad_sum)

    def _jvp_products(
        self, pairs, names, leaves_p, z_grad, batch: int, rows: int
    ) -> ForwardProducts:
        """K via output tangents J·Z_r of the whole batch, R rows at a time in blocks."""
        plist = [leaves_p[n] for n in names]
        outs = [o for o, _ in pairs]
        cots = [c.to(o.dtype) for o, c in pairs]
        # Σ_i G_i = Jᵀc, one plain backward
        gsum = torch.autograd.grad(outs, plist, cots, retain_graph=True, allow_unused=True)
        grad_sum = {
            n: (g if g is not None else torch.zeros_like(p)) for n, g, p in zip(names, gsum, plist)
        }
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        jtu = torch.autograd.grad(outs, plist, us, create_graph=True, allow_unused=True)
        s_rows = None
        for n, g in zip(names, jtu):
            if g is None:
                continue
            v = z_grad[n].reshape(rows, -1) @ g.reshape(-1)
            s_rows = v if s_rows is None else s_rows + v
        k = torch.zeros(batch, rows, dtype=cots[0].dtype, device=cots[0].device)
        if s_rows is None or not s_rows.requires_grad:
            return ForwardProducts(k, None, grad_sum)
        eye = torch.eye(rows, dtype=s_rows.dtype, device=s_rows.device)
        for start in range(0, rows, self.block_rows):
            stop = min(rows, start + self.block_rows)
            tangents = self._row_tangents(s_rows, us, eye[start:stop])
            for t, c in zip(tangents, cots):
                if t is None:
                    continue
                k[:, start:stop] += (t * c.unsqueeze(0)).reshape(stop - start, batch, -1).sum(-1).T
        return ForwardProducts(k, None, grad_sum)

    def _row_tangents(self, s_rows: Tensor, us: list[Tensor], sel: Tensor) -> list[Tensor | None]:
        if self._batched_ok:
            try:
                return list(
                    torch.autograd.grad(
                        s_rows, us, sel, retain_graph=True, is_grads_batched=True, allow_unused=True
                    )
                )
            except RuntimeError as e:
                log.warning("batched output tangents failed (%s); looping over rows", e)
                self._batched_ok = False
        per_row = [
            torch.autograd.grad(s_rows, us, r, retain_graph=True, allow_unused=True) for r in sel
        ]
        return [
            None
            if all(row[j] is None for row in per_row)
            else torch.stack(
                [row[j] if row[j] is not None else torch.zeros_like(u) for row in per_row]
            )
            for j, u in enumerate(us)
        ]

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
                        [o for o, _ in pairs],
                        plist,
                        grad_outputs,
                        retain_graph=True,
                        allow_unused=True,
                    )
                )
            )
        out: list[Tensor | None] = []
        for j, p in enumerate(plist):
            col = [row[j] for row in per_row]
            out.append(
                None
                if all(g is None for g in col)
                else torch.stack([g if g is not None else torch.zeros_like(p) for g in col])
            )
        return out
