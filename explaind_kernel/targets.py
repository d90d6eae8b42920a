"""What is explained: the target f(x; θ) read off the model output, per test input.

A target maps the model output of a chunk of test inputs, and those inputs' labels aligned
to its rows, to the explained values — ``fn(output [n, ...], labels [n, ...]) -> [n] or
[n, O]`` — in the spirit of TRAK's model-output functions. The engine differentiates that
map, so every named target below is exact, like the raw logits.

Named targets (a small registry; add your own with `register_target`):

* ``"all"``       every entry of the output, flattened: [n, O].
* ``"predicted"`` the entry the final model θ_T ranks highest (argmax of the flattened
                  output), the same entry along the whole path: [n, 1].
* ``"label"``     the output at the label: ``out[..., y]`` (class logits: the true-class logit).
* ``"loss"``      the test loss of the label: cross-entropy ``logsumexp(out) − out[y]``. For a
                  model that ends in ``log_softmax`` the output rows are already
                  log-probabilities and the loss is the NLL ``−out[y]``. Which one is decided
                  from the output: when every row of f(x; θ_T) has |logsumexp| ≤ 1e-4 the
                  output is taken as log-probabilities (``loss (nll)``), else as logits
                  (``loss (cross-entropy)``). Both are the same function of θ for a
                  log_softmax model (log_softmax is idempotent), so the choice only saves
                  rounding; outputs that are probabilities (rows in [0, 1] summing to 1) are
                  refused — take their log in the model, or pass a callable.
* ``"margin"``    ``out[y] − logsumexp(out[others])``, TRAK's margin (positive when the label
                  wins by a clear margin).

Labels are class indices ([n] for [n, C] outputs; [n, L] token ids for [n, L, C] outputs);
a callable gets whatever labels were given (regression targets, token ids: any tensor) or
None. A callable of one argument, ``fn(output)``, is called without labels.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "Target",
    "register_target",
    "registered_targets",
    "resolve_target",
]

TargetFn = Callable[[Tensor, "Tensor | None"], Tensor]

#: |logsumexp| below which the rows of an output are taken as log-probabilities.
LOG_PROB_TOL = 1e-4


@dataclass(frozen=True)
class Target:
    """One explained target.

    name:        how it is called (``outputs=name``) and what results name their outputs.
    fn:          ``fn(output, labels) -> [n] or [n, O]`` on the primary output tensor.
    labels:      "class" (class indices into the output's last axis, checked), "any" (passed
                 as given, may be None) or "none" (ignored).
    rows:        "labels" (the rows' labels go to fn) or "predicted" (the argmax of the
                 final model's flattened output does, whatever labels were given).
    specialise:  optional ``(target, output at θ_T) -> target``, deciding a form from the
                 final output once before the sweep (``loss``: nll or cross-entropy).
    """

    name: str
    fn: TargetFn
    labels: str = "any"
    rows: str = "labels"
    specialise: Callable[[Target, Tensor], Target] | None = None
    output_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.labels not in ("class", "any", "none"):
            raise InputError(f"Target.labels must be 'class', 'any' or 'none', got {self.labels!r}")
        if self.rows not in ("labels", "predicted"):
            raise InputError(f"Target.rows must be 'labels' or 'predicted', got {self.rows!r}")

    @property
    def needs_labels(self) -> bool:
        return self.labels == "class"

    def names(self, width: int) -> list[str]:
        """Names of the O explained values per test input."""
        if self.output_names is not None and len(self.output_names) == width:
            return list(self.output_names)
        if self.name == "all":
            return [f"output[{j}]" for j in range(width)]
        return [self.name] if width == 1 else [f"{self.name}[{j}]" for j in range(width)]


_REGISTRY: dict[str, Target] = {}


def register_target(
    name: str,
    *,
    labels: str = "class",
    replace_existing: bool = False,
) -> Callable[[TargetFn], TargetFn]:
    """Decorator: make ``fn(output, labels) -> [n] or [n, O]`` available as ``outputs=name``.

    labels="class" checks that labels are in-range class indices of the output's last axis
    (one per row, or one per position for [n, L, C] outputs); "any" passes them as given
    (None without labels). Registering a taken name raises unless replace_existing=True.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"a target name must be a non-empty string, got {name!r}")

    def deco(fn: TargetFn) -> TargetFn:
        if name in _REGISTRY and not replace_existing:
            raise InputError(
                f"a target named {name!r} is already registered; pass replace_existing=True "
                "to replace it, or choose another name"
            )
        _REGISTRY[name] = Target(name, fn, labels=labels)
        return fn

    return deco


def registered_targets() -> list[str]:
    """The names `outputs=` accepts, sorted."""
    return sorted(_REGISTRY)


def resolve_target(spec: str | Target | Callable) -> Target:
    """The Target for ``outputs=spec``: a registered name, a Target, or a callable."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, str):
        target = _REGISTRY.get(spec)
        if target is None:
            raise InputError(
                f"outputs={spec!r} is not a registered target; use one of "
                f"{registered_targets()}, a function fn(output, labels) -> [n] or [n, O], or "
                "register one with explaind_kernel.register_target"
            )
        return target
    if callable(spec):
        name = getattr(spec, "__name__", "explained")
        name = "explained" if name == "<lambda>" else name
        return Target(name, _with_labels(spec), labels="any")
    raise InputError(
        f"outputs={spec!r} is not understood; use one of {registered_targets()} or a function "
        "fn(output, labels) mapping the model output [n, ...] to [n] or [n, O]"
    )


def _with_labels(fn: Callable) -> TargetFn:
    """fn itself when it takes (output, labels); a wrapper dropping labels for fn(output)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: assume (output, labels)
        return fn
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return fn
    return lambda out, _labels: fn(out)


# ------------------------------------------------------------------ label checks


def check_labels(target: Target, labels: Tensor | None, n: int, out_T: Tensor | None) -> None:
    """Refuse labels that do not fit `target` and the final output `out_T` [n, ...]: the
    wrong number of rows, non-integer class labels, or a class out of range (naming the row)."""
    if labels is None:
        if target.needs_labels:
            raise InputError(
                f"outputs={target.name!r} needs labels: pass labels= (one class index per test "
                "input), inputs as an (x, y) tuple, or a Dataset/DataLoader yielding (x, y)"
            )
        return
    if labels.dim() == 0 or labels.shape[0] != n:
        got = "a scalar" if labels.dim() == 0 else f"{labels.shape[0]} rows"
        raise InputError(f"labels has {got} for {n} test inputs; give one label per test input")
    if not target.needs_labels or out_T is None:
        return
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(
            f"outputs={target.name!r} needs integer class indices as labels, got {labels.dtype}; "
            "convert them with labels.long()"
        )
    if out_T.dim() < 2 or out_T.shape[-1] < 2:
        raise InputError(
            f"outputs={target.name!r} needs class scores (an output [n, C] with C ≥ 2), but the "
            f"model output has shape {tuple(out_T.shape)}; explain it with outputs='all' or a "
            "function fn(output, labels)"
        )
    if tuple(labels.shape) != tuple(out_T.shape[:-1]):
        raise InputError(
            f"labels of shape {tuple(labels.shape)} do not fit the model output "
            f"{tuple(out_T.shape)}: give one class index per row (shape {tuple(out_T.shape[:-1])})"
        )
    classes = out_T.shape[-1]
    bad = ((labels < 0) | (labels >= classes)).reshape(n, -1).any(dim=1).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        value = labels[row].tolist()
        raise InputError(
            f"labels[{row}] = {value} is out of range for {classes} classes (the model output "
            f"has shape {tuple(out_T.shape)}); class indices must be in 0..{classes - 1}"
        )


def row_labels(target: Target, labels: Tensor | None, out_T: Tensor | None, n: int) -> Tensor:
    """The per-row tensor the sweep carries for `target`: the labels, the final model's
    argmax ("predicted"), or zeros when there is nothing to carry."""
    if target.rows == "predicted":
        if out_T is None:
            raise InputError("outputs='predicted' needs the final model's output")
        return out_T.reshape(n, -1).argmax(dim=1)
    if labels is not None:
        return labels
    device = out_T.device if out_T is not None else None
    return torch.zeros(n, dtype=torch.long, device=device)


# ------------------------------------------------------------------ named targets


def _gather(out: Tensor, labels: Tensor) -> Tensor:
    return out.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def _all(out: Tensor, _labels: Tensor | None) -> Tensor:
    return out.reshape(out.shape[0], -1)


def _predicted(out: Tensor, index: Tensor) -> Tensor:
    return out.reshape(out.shape[0], -1).gather(1, index.reshape(-1, 1))


def label_value(out: Tensor, labels: Tensor) -> Tensor:
    """out[..., y]: the output at the label (the true-class logit)."""
    return _gather(out, labels)


def cross_entropy(out: Tensor, labels: Tensor) -> Tensor:
    """logsumexp(out) − out[y], per row (per position for [n, L, C] outputs)."""
    return torch.logsumexp(out, dim=-1) - _gather(out, labels)


def nll(out: Tensor, labels: Tensor) -> Tensor:
    """−out[y]: the loss of log-probability outputs (a model ending in log_softmax)."""
    return -_gather(out, labels)


def margin(out: Tensor, labels: Tensor) -> Tensor:
    """out[y] − logsumexp(out[c ≠ y]), per row (per position for [n, L, C] outputs)."""
    classes = torch.arange(out.shape[-1], device=out.device)
    others = out.masked_fill(classes == labels.long().unsqueeze(-1), -math.inf)
    return _gather(out, labels) - torch.logsumexp(others, dim=-1)


def _specialise_loss(target: Target, out_T: Tensor) -> Target:
    rows = out_T.reshape(-1, out_T.shape[-1]).double()
    lse = torch.logsumexp(rows, dim=-1)
    if bool(((rows >= 0) & (rows <= 1)).all()) and bool(
        ((rows.sum(-1) - 1).abs() <= LOG_PROB_TOL).all()
    ):
        raise InputError(
            "outputs='loss' needs logits or log-probabilities, but every row of the model output "
            "lies in [0, 1] and sums to 1 (probabilities); end the model with log_softmax, or "
            "pass outputs=lambda out, y: -out.gather(-1, y[:, None]).log()"
        )
    if bool((lse.abs() <= LOG_PROB_TOL).all()):
        return replace(target, fn=nll, specialise=None, output_names=("loss (nll)",))
    return replace(
        target, fn=cross_entropy, specialise=None, output_names=("loss (cross-entropy)",)
    )


_REGISTRY.update(
    {
        "all": Target("all", _all, labels="none"),
        "predicted": Target("predicted", _predicted, labels="none", rows="predicted"),
        "label": Target("label", label_value, labels="class"),
        "loss": Target("loss", cross_entropy, labels="class", specialise=_specialise_loss),
        "margin": Target("margin", margin, labels="class"),
    }
)
