"""Training side: per-sample kernel values K(x; i, τ) = c_{i,τ} · (J(x_i; θ_τ) Z_τ).

Each recorded forward is replayed *batched* at θ_τ with the recorded RNG state, module modes and
buffers, so dropout masks and batch-norm batch statistics are those of training. The routes give
the same numbers (tested against each other):

* "per_sample": G_i = J(x_i)ᵀ c_i from one backward vmapped over one-hot row cotangents
  (train_persample.py, `is_grads_batched`; each row's cotangent scaled by a power of two, so
  no backward runs on subnormals), in blocks of rows; then K = G·Zᵀ. Costs one full-batch
  backward per batch row, O(B²), but splits K by parameter tensor for free.
* "forward_ad": the batch's output tangents along each adjoint row, J·Z_r, by forward-mode
  AD of the replay (train_forward.py: torch.func.jvp vmapped over blocks of rows); then
  K[:, r] = c · (J·Z_r). About R forward-tangent passes of the batch, no B × P memory, exact
  whatever couples the samples (train-mode batch norm, dropout).
* "jvp": the same tangents by the double-backward trick (train_jvp.py; d/du ⟨Jᵀu, Z_r⟩ =
  J·Z_r) where an op has no forward-mode formula; O(R) passes, slower than "forward_ad".

* "rules": per-sample gradients from persample's layer rules on one replayed forward and
  one backward (train_rows.py): one batch backward's cost plus a matrix product per tensor,
  checked per sample every `check_every`-th forward; when a parameter has no rule or the check
  fails (samples interact, e.g. through train-mode batch norm) the forward, and the rest of
  the run, go through "forward_ad" ("per_sample" when K is split by parameter tensor; "jvp"
  where forward-mode AD cannot run the model). "vmap" is an older name of this route.

"auto" measures: on the first forward of a run it times each route that applies (the results
of the chosen one are returned, so auto equals the explicit choice of the route it reports in
`route`), and keeps the fastest for the run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from explaind_trace.reforward import tree_leaves, tree_to

from .config import TRAINING_MODES
from .errors import InputError
from .functional import FunctionalModel
from .persample.local import math_attention
from .train_blocks import (
    competitive,
    counting_activations,
    limited_probe,
    mark_block,
    probe_seconds,
    rows_per_block,
)
from .train_forward import forward_products, load_decompositions
from .train_jvp import jvp_products
from .train_persample import block_grads
from .train_rows import rows_check, rule_grads
from .workmodel import forward_flops

ROUTES = TRAINING_MODES
#: auto does not measure forward_ad where its arithmetic is at least this many times the
#: rules route's (`TrainingSide._tangent_bound`): on the bench Transformers 2.7–4.5 times,
#: and its probe alone cost more than the whole rules route's forward
TANGENT_MARGIN = 2.0

log = logging.getLogger(__name__)


@dataclass
class ForwardProducts:
    """Kernel values of one recorded forward pass."""

    k: Tensor  # [B, R] per batch row
    k_param: dict[str, Tensor] | None  # {param: [B, R]} per parameter tensor (when asked)
    grad_sum: dict[str, Tensor]  # Σ_i G_i per parameter tensor (for slices and checks)
    # {param: [R]} Σ_i K_n per parameter tensor (= ⟨Z_n, Σ_i G_i⟩), where a route had the
    # per-tensor products anyway; None: the caller takes ⟨Z_n, grad_sum_n⟩
    k_sum: dict[str, Tensor] | None = None


class TrainingSide:
    """Replays recorded training forwards and contracts per-sample gradients with Z_τ."""

    def __init__(
        self,
        fm: FunctionalModel,
        *,
        block_rows: int = 64,
        mode: str = "auto",
        check_every: int = 16,
    ) -> None:
        if mode not in ROUTES:
            raise InputError(
                f"training_mode must be one of {', '.join(repr(r) for r in ROUTES)}, got {mode!r}"
            )
        self.fm = fm
        self.block_rows = max(1, int(block_rows))
        self.mode = "rules" if mode == "vmap" else mode
        self.check_every = max(1, int(check_every))
        self._batched_ok = True
        self._forwards = 0
        self.timings: dict[str, float] = {}
        self._check_seconds = 0.0  # the rules route's last per-sample check took this long

    @property
    def route(self) -> str | None:
        """The route auto chose for this run (shared by every chunk), or None before."""
        return getattr(self.fm, "training_route", None)

    def _rules_ok(self) -> bool:
        return getattr(self.fm, "training_rules_ok", True)

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
        self._forwards += 1
        mode = self.mode
        if mode == "auto" and self.route is not None:
            mode = self.route
        if mode == "auto":
            got = self._calibrate(params, buffers, forward, z_grad, per_param)
            self._count(self.route or "auto")
            return got
        if mode == "rules":
            got = self._rule_products(params, buffers, forward, z_grad, per_param)
            if got is not None:
                self._count("rules")
                return got
            mode = self._batched_route(forward, z_grad, per_param)
        if mode == "forward_ad" and per_param:
            mode = "per_sample"  # K by parameter tensor: the per-sample route splits it for free
        if mode == "forward_ad":
            got = self._forward_ad(params, buffers, forward, z_grad, strict=self.mode != "rules")
            if got is not None:
                self._count(mode)
                return got
            mode = "jvp"
        self._count(mode)
        return self._batched(params, buffers, forward, z_grad, per_param=per_param, mode=mode)

    def _count(self, route: str) -> None:
        """Count the forwards each route answered (shared by the run's chunks: result.extra)."""
        counts = getattr(self.fm, "training_routes", None)
        if counts is None:
            counts = self.fm.training_routes = {}  # type: ignore[attr-defined]
        counts[route] = counts.get(route, 0) + 1

    def _batched_route(self, forward, z_grad, per_param: bool) -> str:
        """The route for forwards the rules do not answer: forward-mode AD (one forward-tangent
        pass of the batch per adjoint row) unless per-sample gradients (one batch backward per
        batch row) cost less or K is split by parameter tensor. On the bench CNN an adjoint
        row cost about 2.5 times a batch row (blocks of train_blocks.py)."""
        rows = next(iter(z_grad.values())).shape[0] if z_grad else 0
        cheaper = 5 * rows < 2 * len(forward.ids)
        return "forward_ad" if (cheaper and not per_param) else "per_sample"

    def _forward_ad(self, params, buffers, forward, z_grad, *, strict: bool, probe=None):
        """K by forward-mode AD (train_forward.py). Where an op has no forward-mode formula
        (a custom autograd.Function without jvp) this raises when `strict` (an explicit
        choice), else returns None and the run uses the double-backward "jvp" route."""
        if not getattr(self.fm, "training_forward_ok", True):
            return None
        try:
            k, grad_sum = forward_products(
                self.fm, params, buffers, forward, z_grad, block_rows=self.block_rows, probe=probe
            )
        except (RuntimeError, NotImplementedError, ValueError) as e:
            if strict:
                raise
            log.info("forward-mode AD cannot run this model (%s); jvp route", str(e)[:200])
            self.fm.training_forward_ok = False  # type: ignore[attr-defined]
            return None
        return ForwardProducts(k, None, grad_sum)

    def _calibrate(self, params, buffers, forward, z_grad, per_param) -> ForwardProducts:
        """Measure every route that applies on this forward and keep the fastest for the run.

        The rules route runs in full, timed without its per-sample check (which runs on one
        forward in `check_every`: on the p = 97 Transformer the first forward's check doubled
        its time, and auto took the per-sample route, about twice as slow there); a batched
        route runs its replay and its first two blocks of rows, and its time is extrapolated
        to all blocks (train_blocks.mark_block: so measuring costs about one forward of each
        route, never a whole slow route), or stops after its first block once that alone took
        longer than the fastest route so far; forward_ad is timed again after its first probe
        (a warm-up) when that one came within 1.25 times the fastest (the cold probe ran
        within 10% of the warm one on the bench). "jvp" computes forward_ad's tangents by a
        double backward: it is measured only where forward_ad cannot run; "per_sample" only
        where the rules do not hold (its B backwards of the batch, one per sample, give what
        the rules route gets from one); neither tangent route where the rules hold and the
        tangents' arithmetic is over TANGENT_MARGIN times the rules' (`_tangent_bound`).
        The chosen route then answers this forward in full: auto gives exactly what the
        explicit choice of that route gives."""
        results: dict[str, ForwardProducts] = {}
        bound = None  # the tangent routes' arithmetic over the rules', once the rules ran
        for route in ("rules", "forward_ad", "jvp", "per_sample"):
            if route in ("forward_ad", "jvp") and per_param:
                continue
            if route == "jvp" and "forward_ad" in self.timings:
                continue
            if route == "per_sample" and "rules" in results:
                continue  # B backwards of the batch for what the rules get from one
            if route in ("forward_ad", "jvp") and "rules" in results:
                if bound is None:
                    bound = self._tangent_bound(params, buffers, forward, z_grad)
                if bound > TANGENT_MARGIN:
                    log.info(
                        "training route %s not measured: >= %.1fx the rules' work", route, bound
                    )
                    continue
            if route != "rules":
                load_decompositions()  # once per process: not part of any route's time
            t0 = time.perf_counter()
            if route == "rules":
                self._check_seconds = 0.0
                got = self._rule_products(params, buffers, forward, z_grad, per_param)
                if got is None:
                    continue
                results[route] = got
                # without its per-sample check, which runs on one forward in check_every
                self.timings[route] = time.perf_counter() - t0 - self._check_seconds
                continue
            probe = limited_probe(t0, self.timings)
            try:
                if route == "forward_ad":  # a first run warms it up: timed again if it can win
                    self._forward_ad(params, buffers, forward, z_grad, strict=True, probe=probe)
                    if competitive(probe_seconds(probe, t0), self.timings):
                        t0 = time.perf_counter()
                        probe = limited_probe(t0, self.timings)
                        self._forward_ad(params, buffers, forward, z_grad, strict=True, probe=probe)
                else:
                    self._batched(
                        params,
                        buffers,
                        forward,
                        z_grad,
                        per_param=per_param,
                        mode=route,
                        probe=probe,
                    )
            except (RuntimeError, NotImplementedError, ValueError) as e:  # no derivative, vmap
                log.info("training route %s unavailable (%s)", route, e)
                continue
            self.timings[route] = probe_seconds(probe, t0)
        if not self.timings:
            raise InputError("no training route applies to this forward")  # pragma: no cover
        best = min(self.timings, key=self.timings.get)
        self.fm.training_route = best  # type: ignore[attr-defined]
        log.info("training side: route %s (measured s per forward: %s)", best, self.timings)
        if best in results:
            return results[best]
        if best == "forward_ad":
            return self._forward_ad(params, buffers, forward, z_grad, strict=True)
        return self._batched(params, buffers, forward, z_grad, per_param=per_param, mode=best)

    def _tangent_bound(self, params, buffers, forward, z_grad) -> float:
        """A lower bound on forward_ad's arithmetic over the rules route's, for this forward:
        at least one forward-tangent pass of the batch per adjoint row (R·F, F the batch's
        forward FLOPs as FlopCounterMode counts them) against the rules' replay, backward and
        per-sample gradients (about 4·F) and their products with Z (2·B·P·R)."""
        fm = self.fm
        rows = next(iter(z_grad.values())).shape[0]
        width = sum(int(z[0].numel()) for z in z_grad.values())
        args = tree_to(tuple(forward.args), fm.device, fm.dtype)
        kwargs = tree_to(dict(forward.kwargs), fm.device, fm.dtype)
        bufs = {k: v.clone() for k, v in buffers.items()}
        with fm.recorded_mode(forward):
            f = forward_flops(lambda: fm(params, bufs, args, kwargs))
        rules = 4.0 * f + 2.0 * len(forward.ids) * width * rows
        return rows * f / rules if rules > 0 else 0.0

    def _rule_products(self, params, buffers, forward, z_grad, per_param):
        """K by per-sample layer rules (train_rows.py), or None (and batched routes from then
        on) when a parameter has no rule or the per-sample check fails."""
        if not self._rules_ok() or not z_grad:
            return None
        names = list(z_grad)
        fm = self.fm
        try:
            grads = rule_grads(fm, params, buffers, forward, names)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            log.info("per-sample layer rules failed (%s)", str(e).splitlines()[0])
            grads = None
        if grads is None:
            log.info("per-sample layer rules do not cover every parameter; batched route")
            fm.training_rules_ok = False  # type: ignore[attr-defined]
            return None
        rows = next(iter(z_grad.values())).shape[0]
        batch = len(forward.ids)
        k = torch.zeros(batch, rows, dtype=fm.dtype, device=fm.device)
        k_param = {} if per_param else None
        grad_sum, k_sum = {}, {}
        for n in names:
            g = grads[n].reshape(batch, -1)
            kn = g @ z_grad[n].reshape(rows, -1).T
            k += kn
            if k_param is not None:
                k_param[n] = kn
            grad_sum[n] = g.sum(0).reshape(params[n].shape)
            k_sum[n] = kn.sum(0)
        count = getattr(fm, "training_checks", 0)
        if count % self.check_every == 0:
            t0 = time.perf_counter()
            holds = rows_check(fm, params, buffers, forward, grads, z_grad, k, seed=count)
            self._check_seconds = time.perf_counter() - t0
            if not holds:
                log.warning(
                    "per-sample gradients by layer rules do not hold per sample on this model "
                    "(samples interact in the forward, e.g. train-mode batch norm); using a "
                    "batched route for the training side"
                )
                fm.training_rules_ok = False  # type: ignore[attr-defined]
                return None
        fm.training_checks = count + 1  # type: ignore[attr-defined]
        return ForwardProducts(k, k_param, grad_sum, k_sum)

    def _batched(
        self,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        forward,
        z_grad: Mapping[str, Tensor],
        *,
        per_param: bool,
        mode: str,
        probe: dict[str, float] | None = None,
    ) -> ForwardProducts:
        """K by one batched replay and a batched route ("per_sample" or "jvp"), in blocks of
        rows sized to the replay's activations (train_blocks.py). With `probe`,
        only the first two blocks of rows run (train_forward.mark_block: auto's calibration)."""

        fm = self.fm
        device, dtype = fm.device, fm.dtype
        names = [n for n in z_grad]
        leaves_p = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        other = {n: params[n] for n in params if n not in z_grad}
        bufs = {k: v.clone() for k, v in buffers.items()}
        args = tree_to(tuple(forward.args), device, dtype)
        kwargs = tree_to(dict(forward.kwargs), device, dtype)

        # the jvp route differentiates twice: fused attention kernels cannot
        twice = math_attention() if mode == "jvp" else contextlib.nullcontext()
        with (
            fm.recorded_mode(forward),
            torch.enable_grad(),
            twice,
            counting_activations(fm.module) as saved,
        ):
            out = fm({**leaves_p, **other}, bufs, args, kwargs)
        step = rows_per_block(saved[0], self.block_rows)  # rows per vmapped block

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
        if mode == "jvp" and not per_param:
            with torch.enable_grad():  # the sweep runs under no_grad; tangents need a graph
                k, grad_sum, self._batched_ok = jvp_products(
                    pairs,
                    [leaves_p[n] for n in names],
                    names,
                    z_grad,
                    batch,
                    block_rows=step,
                    batched=self._batched_ok,
                    probe=probe,
                )
            return ForwardProducts(k, None, grad_sum)
        k = torch.zeros(batch, rows, dtype=dtype, device=device)
        k_param = (
            {n: torch.zeros(batch, rows, dtype=dtype, device=device) for n in names}
            if per_param
            else None
        )
        grad_sum = {n: torch.zeros_like(leaves_p[n]) for n in names}
        k_sum = {n: torch.zeros(rows, dtype=dtype, device=device) for n in names}
        plist = [leaves_p[n] for n in names]
        zflat = {n: z_grad[n].reshape(rows, -1) for n in names}

        for done, start in enumerate(range(0, batch, step), 1):
            stop = min(batch, start + step)
            grads, self._batched_ok = block_grads(pairs, plist, start, stop, self._batched_ok)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                g = g.reshape(stop - start, -1)
                kn = g @ zflat[n].T
                k[start:stop] += kn
                if k_param is not None:
                    k_param[n][start:stop] = kn
                grad_sum[n] += g.sum(0).reshape(grad_sum[n].shape)
                k_sum[n] += kn.sum(0)
            if mark_block(probe, done, -(-batch // step)):
                break
        return ForwardProducts(k, k_param, grad_sum, k_sum)
