"""Pruning curves: zero the lowest-scoring parameters and measure a metric per sparsity.

At sparsity s, the round(s × E) lowest-scoring eligible entries are set to zero, where E is
the number of eligible entries: the elements of the chosen tensors (`params`) whose `mask`
entry is True. The ranking is global across the chosen tensors and uses a stable sort on
(score, position), position being the tensor order then the flat C-order index, so curves
are exactly reproducible. Everything happens on a copy: the caller's model, its
parameters, buffers and gradients are never modified, and entries that are not eligible
keep their values in the pruned copy.

Methods: "scores" (the kernel's parameter-wise influence scores, result.param_scores),
"magnitude" (|θ|) and "taylor" (|θ ⊙ ∂L/∂θ|, first order, with L = loss_fn(model)), the
baselines computed on the same model as the curve.
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from explaind_kernel.result import KernelResult

from ._common import require
from .errors import PruningError

__all__ = ["METHODS", "PruneCurve", "prune_copy", "prune_curve", "prune_curves", "ranking_scores"]

log = logging.getLogger(__name__)

METHODS = ("scores", "magnitude", "taylor")
Method = Literal["scores", "magnitude", "taylor"]
ScoreSource = KernelResult | Mapping[str, Any] | None


@dataclass(frozen=True)
class PruneCurve:
    """A metric per sparsity: `pruned[i]` entries of `eligible` were zeroed at sparsities[i]."""

    method: str
    sparsities: tuple[float, ...]
    metrics: tuple[float, ...]
    pruned: tuple[int, ...]
    eligible: int

    def to_frame(self) -> pd.DataFrame:
        """Columns: method, sparsity, pruned, metric."""
        return pd.DataFrame(
            {
                "method": [self.method] * len(self.sparsities),
                "sparsity": list(self.sparsities),
                "pruned": list(self.pruned),
                "metric": list(self.metrics),
            }
        )


def _to_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise PruningError(f"{what} is not numeric ({type(value).__name__}): {e}") from e


def _chosen(model: torch.nn.Module, params: Sequence[str] | None) -> dict[str, torch.nn.Parameter]:
    named = dict(model.named_parameters())
    if params is None:
        return {n: p for n, p in named.items() if p.requires_grad}
    unknown = [n for n in params if n not in named]
    if unknown:
        raise PruningError(f"the model has no parameters {unknown}; it has {list(named)}")
    return {n: named[n] for n in params}


def ranking_scores(
    model: torch.nn.Module,
    scores: ScoreSource,
    *,
    method: Method = "scores",
    loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    params: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The per-element scores a method ranks by (name → float64 array of the param's shape).

    params: the tensors to rank (default: every parameter with requires_grad).
    """
    chosen = _chosen(model, params)
    if method == "scores":
        if scores is None:
            raise PruningError("method='scores' needs scores (a KernelResult or name → array)")
        source = require(scores, "param_scores") if isinstance(scores, KernelResult) else scores
        missing = [n for n in chosen if n not in source]
        if missing:
            raise PruningError(
                f"no scores for parameters {missing}; pass params=[...] to rank only scored "
                f"tensors (scored: {sorted(source)})"
            )
        out = {n: _to_numpy(source[n], f"the score of {n!r}") for n in chosen}
    elif method == "magnitude":
        out = {n: np.abs(_to_numpy(p, n)) for n, p in chosen.items()}
    elif method == "taylor":
        out = _taylor(model, chosen, loss_fn)
    else:
        raise PruningError(f"unknown pruning method {method!r}; choose one of {METHODS}")
    for n, p in chosen.items():
        if out[n].shape != tuple(p.shape):
            raise PruningError(
                f"the scores of {n!r} have shape {out[n].shape} but the parameter has "
                f"shape {tuple(p.shape)}"
            )
        if not np.all(np.isfinite(out[n])):
            raise PruningError(f"the scores of {n!r} contain NaN or infinite values")
    return out


def _taylor(
    model: torch.nn.Module,
    chosen: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None,
) -> dict[str, np.ndarray]:
    if loss_fn is None:
        raise PruningError("method='taylor' needs loss_fn(model) -> scalar loss on your data")
    frozen = [n for n, p in chosen.items() if not p.requires_grad]
    if frozen:
        raise PruningError(f"method='taylor' needs gradients, but {frozen} do not require grad")
    work = _copy_model(model)
    named = dict(work.named_parameters())
    loss = loss_fn(work)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PruningError("loss_fn(model) must return a scalar torch.Tensor")
    tensors = [named[n] for n in chosen]
    grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
    out = {}
    for n, p, g in zip(chosen, tensors, grads):
        theta = _to_numpy(p, n)
        out[n] = np.abs(theta * _to_numpy(g, n)) if g is not None else np.zeros_like(theta)
    return out


def _copy_model(model: torch.nn.Module) -> torch.nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:  # anything deepcopy may raise on exotic modules
        raise PruningError(
            f"cannot copy the model ({type(e).__name__}: {e}); pruning never edits the "
            "original, so the model must support copy.deepcopy"
        ) from e


@dataclass(frozen=True)
class _Plan:
    names: tuple[str, ...]
    owner: np.ndarray  # [E] tensor index of each eligible entry, in ranking order
    local: np.ndarray  # [E] flat index inside its tensor, in ranking order
    shapes: tuple[tuple[int, ...], ...]

    @property
    def eligible(self) -> int:
        return len(self.owner)

    def zero_masks(self, k: int) -> list[np.ndarray]:
        """One boolean array per tensor: True where the k lowest-ranked entries lie."""
        masks = [np.zeros(int(np.prod(s)), dtype=bool) for s in self.shapes]
        for j, m in enumerate(masks):
            m[self.local[:k][self.owner[:k] == j]] = True
        return [m.reshape(s) for m, s in zip(masks, self.shapes)]


def _plan(ranked: dict[str, np.ndarray], mask: Mapping[str, Any] | None) -> _Plan:
    mask = dict(mask or {})
    unknown = [n for n in mask if n not in ranked]
    if unknown:
        raise PruningError(f"mask names {unknown} are not among the pruned tensors {list(ranked)}")
    flat_scores, owner, local = [], [], []
    for j, (name, score) in enumerate(ranked.items()):
        eligible = np.ones(score.shape, dtype=bool)
        if name in mask:
            m = mask[name]
            m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
            if m.shape != score.shape:
                raise PruningError(
                    f"the mask of {name!r} has shape {m.shape}, the parameter {score.shape}"
                )
            eligible = m.astype(bool)
        positions = np.flatnonzero(eligible.reshape(-1))
        flat_scores.append(score.reshape(-1)[positions])
        owner.append(np.full(len(positions), j, dtype=np.int64))
        local.append(positions)
    scores = np.concatenate(flat_scores) if flat_scores else np.zeros(0)
    order = np.argsort(scores, kind="stable")
    return _Plan(
        names=tuple(ranked),
        owner=(np.concatenate(owner) if owner else np.zeros(0, np.int64))[order],
        local=(np.concatenate(local) if local else np.zeros(0, np.int64))[order],
        shapes=tuple(tuple(s.shape) for s in ranked.values()),
    )


def _check_sparsities(sparsities: Sequence[float] | float) -> tuple[float, ...]:
    values = (sparsities,) if isinstance(sparsities, numbers.Real) else tuple(sparsities)
    bad = [
        s
        for s in values
        if isinstance(s, bool) or not (isinstance(s, numbers.Real) and 0.0 <= float(s) <= 1.0)
    ]
    if bad or not values:
        raise PruningError(f"sparsities must be numbers in [0, 1], got {list(values)!r}")
    return tuple(float(s) for s in values)


def _apply(work: torch.nn.Module, plan: _Plan, k: int) -> None:
    named = dict(work.named_parameters())
    with torch.no_grad():
        for name, zero in zip(plan.names, plan.zero_masks(k)):
            p = named[name]
            p.masked_fill_(torch.as_tensor(zero, device=p.device), 0)


def prune_copy(
    model: torch.nn.Module,
    scores: ScoreSource,
    sparsity: float,
    *,
    method: Method = "scores",
    loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    params: Sequence[str] | None = None,
    mask: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A pruned copy of `model` at one sparsity (the model itself is left unchanged)."""
    (s,) = _check_sparsities([sparsity])
    plan = _plan(ranking_scores(model, scores, method=method, loss_fn=loss_fn, params=params), mask)
    work = _copy_model(model)
    _apply(work, plan, int(round(s * plan.eligible)))
    return work


def prune_curve(
    model: torch.nn.Module,
    scores: ScoreSource,
    sparsities: Sequence[float],
    evaluate: Callable[[torch.nn.Module], float],
    *,
    method: Method = "scores",
    loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    params: Sequence[str] | None = None,
    mask: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> PruneCurve:
    """`evaluate(pruned copy)` at each sparsity, pruning the lowest-ranked entries first.

    scores: a KernelResult (its param_scores) or name → array, for method="scores"
        (ignored by the baselines). params: tensors to prune (default: all trainable).
    mask: name → boolean array of the parameter's shape; False entries are never pruned.
    progress: tqdm bar on/off (None: only on a terminal).
    """
    values = _check_sparsities(sparsities)
    plan = _plan(ranking_scores(model, scores, method=method, loss_fn=loss_fn, params=params), mask)
    work = _copy_model(model)
    original = {k: v.detach().clone() for k, v in work.state_dict().items()}
    metrics, pruned = [], []
    bar = tqdm(
        values, desc=f"pruning ({method})", disable=None if progress is None else not progress
    )
    for s in bar:
        work.load_state_dict(original)
        k = int(round(s * plan.eligible))
        _apply(work, plan, k)
        try:
            metric = float(evaluate(work))
        except (TypeError, ValueError) as e:
            raise PruningError(f"evaluate(model) must return a number: {e}") from e
        log.debug(
            "pruning %s: sparsity %.4f, %d of %d zeroed, metric %g",
            method,
            s,
            k,
            plan.eligible,
            metric,
        )
        metrics.append(metric)
        pruned.append(k)
    return PruneCurve(method, values, tuple(metrics), tuple(pruned), plan.eligible)


def prune_curves(
    model: torch.nn.Module,
    scores: ScoreSource,
    sparsities: Sequence[float],
    evaluate: Callable[[torch.nn.Module], float],
    *,
    methods: Sequence[Method] = METHODS,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    params: Sequence[str] | None = None,
    mask: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Several methods' curves on the same model, stacked: method, sparsity, pruned, metric."""
    frames = [
        prune_curve(
            model,
            scores,
            sparsities,
            evaluate,
            method=m,
            loss_fn=loss_fn,
            params=params,
            mask=mask,
            progress=progress,
        ).to_frame()
        for m in methods
    ]
    return pd.concat(frames, ignore_index=True)
