"""Recompute a step's gradient from its recorded forwards (``gradients="recompute"``/``"auto"``).

The optimizer of step t saw p.grad = Σ_f J_f(θ_t)ᵀ c_f, accumulated by autograd over the
step's forwards f in the order they were run, each forward's J_f that of the recorded forward
(RNG state, modes, buffers). So each forward is run again at θ_t (``reforward``) and
differentiated with its recorded cotangent; the per-forward gradients are summed in recorded
order, as autograd accumulated them into p.grad:

- a GradScaler run backpropagated ``scale·c`` and unscaled p.grad by ``1/scale`` (in fp32,
  as ``GradScaler.unscale_``): both are done here too, so the bits are the optimizer's;
- ``zero_grad(set_to_none=False)`` accumulates onto zeros, which turns a -0.0 into +0.0; a
  parameter the optimizer saw a (zero) gradient for but that no forward reached gets zeros;
- forwards under ``no_grad``, never backwarded, or of a skipped AMP step are not in the step;
- a cotangent stored by the cotangent codec is rebuilt from the same replay's logits (and
  left resolved in the record, so the kernel does not replay that forward again for it).

The result is checked against the step's fingerprint (``fingerprint.py``); a mismatch raises
``GradientMismatchError`` naming the step, the parameter and the likely cause.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import fingerprint
from .cotangent_codec import DeferredCotangent
from .errors import GradientMismatchError, RecordingError, TraceError, TraceMismatchError
from .hooks import dense_grads
from .packing import copy_named
from .records import ForwardRecord
from .reforward import reforward, tree_leaves
from .trees import build_tree

__all__ = ["step_gradients", "checked_gradients", "GradientRecompute", "StepGradients", "REMEDY"]

logger = logging.getLogger(__name__)

REMEDY = (
    "A gradient that does not come only through the recorded model output cannot be "
    "recomputed: record this run with gradients='stored', or gradients='auto' (which stores "
    "gradients from the first checkpoint step where they differ)."
)


def _unscale(g: Tensor, scale: float) -> Tensor:
    inv = torch.tensor(scale, dtype=torch.float64).reciprocal().float()
    wide = torch.promote_types(g.dtype, torch.float32)
    return (g.to(wide) * inv.to(g.device, wide)).to(g.dtype)


def _scaled(c: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    if scale == 1.0:
        return c.to(dtype)
    wide = torch.promote_types(c.dtype, torch.float32)
    return (c.to(wide) * torch.tensor(scale, dtype=wide, device=c.device)).to(dtype)


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def step_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    forwards: Iterable[tuple[ForwardRecord, Mapping[str, Tensor]]],
    *,
    output_module: str | None,
) -> dict[str, Tensor]:
    """Σ_f J_fᵀ c_f over ``(forward, buffers it ran with)`` in order, as p.grad held it after
    the step's backwards (unscaled like ``GradScaler.unscale_``); parameters no forward
    reached are absent."""
    names = list(params)
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    acc: dict[str, Tensor] = {}
    scale = 1.0
    for fwd, buffers in forwards:
        out = reforward(model, leaves, buffers, fwd, output_module=output_module, grad=True)
        if isinstance(fwd.cotangent, DeferredCotangent):  # codec-stored: from these logits
            fwd.cotangent = fwd.cotangent.resolve(_detached(out))
        outs, cots = tree_leaves(out), tree_leaves(fwd.cotangent)
        if len(outs) != len(cots):
            raise TraceMismatchError(
                f"the replayed output has {len(outs)} tensors but the trace recorded "
                f"{len(cots)} cotangents; pass a model of the traced architecture."
            )
        scale = float(getattr(fwd, "grad_scale", 1.0) or 1.0)
        pairs = [
            (o, _scaled(c.to(o.device), scale, o.dtype))
            for o, c in zip(outs, cots)
            if isinstance(o, Tensor) and c is not None and o.requires_grad
        ]
        if not pairs:
            continue
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            [leaves[n] for n in names],
            [c for _, c in pairs],
            allow_unused=True,
        )
        for n, g in zip(names, got):
            if g is not None:
                acc[n] = g if n not in acc else acc[n] + g
    if scale != 1.0:
        acc = {n: _unscale(g, scale) for n, g in acc.items()}
    return acc


def checked_gradients(
    acc: Mapping[str, Tensor],
    fps: Mapping[str, Mapping[str, Any]],
    params: Mapping[str, Tensor],
    *,
    step: int,
    where: str,
) -> dict[str, Tensor]:
    """The optimizer's gradients of a step from the recomputed ``acc``, checked against the
    step's fingerprints ``fps`` (see the module docstring); raises ``GradientMismatchError``."""
    out: dict[str, Tensor] = {}
    for n in acc:
        if n not in fps:
            raise GradientMismatchError(
                f"{where}: step {step}, parameter {n!r}: the recorded forwards give it a "
                "gradient but the optimizer saw none (a gradient hook or code that cleared "
                f"it). {REMEDY}"
            )
    for n, fp in fps.items():
        g = acc.get(n)
        if g is None:
            g = torch.zeros_like(params[n])
        if fingerprint.matches(fp, g, n):
            out[n] = g
            continue
        onto_zeros = g + 0.0  # zero_grad(set_to_none=False): 0 + g maps -0.0 to +0.0
        if fingerprint.matches(fp, onto_zeros, n):
            out[n] = onto_zeros
            continue
        cause = fingerprint.likely_cause(fp, g, params[n], n)
        raise GradientMismatchError(
            f"{where}: step {step}, parameter {n!r}: the gradient recomputed from the recorded "
            f"forwards is not the one the optimizer saw; likely cause: {cause}. {REMEDY}"
        )
    return out


class GradientRecompute:
    """Recomputes the gradients of recorded steps with ``model`` (the traced architecture),
    on the device of its parameters."""

    def __init__(self, model: nn.Module, *, output_module: str | None, where: str) -> None:
        if not isinstance(model, nn.Module):
            raise TraceMismatchError(
                f"{where}: model= must be the traced torch.nn.Module, got {type(model).__name__}"
            )
        self.model = model
        self.output_module = output_module
        self.where = where
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def gradients(
        self,
        step: int,
        params: Mapping[str, Tensor],
        forwards: Iterable[tuple[ForwardRecord, Mapping[str, Tensor]]],
        fps: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Tensor]:
        """The checked gradients of step ``step`` at θ_t = ``params`` (on CPU)."""
        dev = self.device
        on_dev = {n: p.to(dev) for n, p in params.items()}  # (replay keeps them there)
        try:
            acc = step_gradients(self.model, on_dev, forwards, output_module=self.output_module)
        except (RuntimeError, TypeError, ValueError) as e:
            raise TraceMismatchError(
                f"{self.where}: step {step}: the model given for recomputing gradients cannot "
                f"run the recorded forward ({type(e).__name__}: {str(e).splitlines()[0]}); pass "
                "a model of the traced architecture."
            ) from e
        got = checked_gradients(acc, fps, on_dev, step=step, where=self.where)
        return {n: g.detach().to("cpu") for n, g in got.items()}


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = fingerprint._INT[a.element_size()]
    return torch.equal(a.detach().view(ints), b.detach().to(a.device).view(ints))


def _as_record(cf: Any) -> ForwardRecord:
    """A captured forward (``CapturedForward``, cotangents finished) as a ``ForwardRecord``."""
    return ForwardRecord(
        args=tuple(build_tree(cf.args, cf.slots, cf.tensors)),
        kwargs=dict(build_tree(cf.kwargs, cf.slots, cf.tensors)),
        cotangent=build_tree(cf.output, [], cf.cotangents),
        ids=[],
        rng_state=cf.rng_state,
        cuda_rng_state=cf.cuda_rng_state,
        training=cf.training,
        mode_overrides=dict(cf.mode_overrides),
        buffers=None,
        grad_scale=cf.grad_scale,
        autocast=dict(cf.autocast or {}),
    )


class StepGradients:
    """What the recorder keeps of each step's gradient under ``RecordOptions.gradients``.

    "stored": the gradients. "recompute": their fingerprints. "auto": fingerprints, and at
    every checkpoint step one extra reforward and backward with the recorded cotangents
    (``step_gradients``) compared bit for bit with the optimizer's gradient; from the first
    step where they differ, the gradients are stored (``switch`` names the step and cause).
    """

    def __init__(self, options: Any, *, ddp: Any = None) -> None:
        mode = options.gradients
        if mode != "stored" and ddp is not None and ddp.world_size > 1:
            raise RecordingError(
                f"gradients={mode!r} is not supported under DistributedDataParallel: the "
                "all-reduced gradient cannot be recomputed bit for bit in one process; record "
                "with gradients='stored'."
            )
        self.recomputing = mode != "stored"
        self.auto = mode == "auto"
        self.every = options.checkpoint_every
        self.output_module = options.output
        #: True while the check's own reforward runs (the recorder's hooks ignore it)
        self.checking = False
        self.stored_from: int | None = None
        self.reason: str | None = None
        self._positions: dict[str, Tensor] = {}

    def store_from(self, t: int, reason: str) -> None:
        """Store gradients from step ``t`` on (auto mode)."""
        self.recomputing = False
        self.stored_from, self.reason = t, reason
        logger.warning("gradients are stored from step %d on: %s", t, reason)

    def check(
        self,
        model: nn.Module,
        t: int,
        grads: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        forwards: list[Any],
    ) -> str | None:
        """Why the optimizer's ``grads`` at step ``t`` are not the gradients recomputed from
        ``forwards`` (captured) at ``params``; None when they are, bit for bit."""
        live = {n: p.detach() for n, p in params.items()}
        pairs = [(_as_record(cf), cf.buffers_in or {}) for cf in forwards]
        acc = step_gradients(model, live, pairs, output_module=self.output_module)
        for n in acc.keys() - grads.keys():
            return f"parameter {n!r} gets a gradient through the output but the optimizer saw none"
        for n, g in grads.items():
            mine = acc.get(n)
            mine = torch.zeros_like(g) if mine is None else mine
            if not (_same_bits(g, mine) or _same_bits(g, mine + 0.0)):
                fp = fingerprint.fingerprints({n: g})[n]
                cause = fingerprint.likely_cause(fp, mine, live[n], n)
                return f"step {t}, parameter {n!r}: {cause}"
        return None

    def capture(
        self, model: nn.Module, t: int, params: Mapping[str, Tensor], forwards: list[Any]
    ) -> dict[str, Any]:
        """The gradient fields of step ``t``'s ``CapturedStep``: the gradients (copied), or
        their fingerprints and fp32 size; the switch reason at the step auto switches."""
        grads = dict(dense_grads(params))
        switch = None
        if self.recomputing and self.auto and t % self.every == 0:
            self.checking = True
            try:
                cause = self.check(model, t, grads, params, forwards)
            except (RuntimeError, TypeError, ValueError, TraceError) as e:  # never stop training
                cause = f"step {t}: the check could not run ({type(e).__name__}: {e})"
            finally:
                self.checking = False
            if cause is not None:
                self.store_from(t, cause)
                switch = cause
        if not self.recomputing:
            return {"grads": copy_named(list(grads.items())), "switch_reason": switch}
        return {
            "grads": {},
            "fingerprints": fingerprint.fingerprints(grads, self._positions),
            "grad_bytes": sum(4 * g.numel() for g in grads.values()),
        }
