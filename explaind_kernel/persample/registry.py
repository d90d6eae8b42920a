"""Layer rules: per-row parameter gradients of one module call from what hooks saw.

A rule gets the module, the `Call` (its inputs, the values of its own parameters and buffers
at that call, its output and the gradient of the explained sum at that output, all with the
rows first) and returns {local parameter name: [R, *shape]}, or None when it cannot treat this
call (then the generic local rule in local.py, and failing that the torch.func route, takes
over). Rules are registered per exact module class: a subclass may change `forward`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass
class Call:
    """One call of a hooked module during a row-capture forward."""

    args: tuple
    kwargs: dict[str, Any]
    state: dict[str, Tensor]  # the module's parameters and buffers (recursive names) at the call
    training: bool
    outputs: list[Tensor]  # tensor outputs, in tree order (tapped)
    grads: list[Tensor | None] = field(default_factory=list)  # their gradients, filled later
    merged: bool = False  # several calls' tokens side by side (capture.py, `merge`)
    seeded: bool = False  # left at a seeded pass's base rows for seeds.py's rules

    @property
    def gout(self) -> Tensor | None:
        return self.grads[0] if self.grads else None


LayerRule = Callable[[nn.Module, Call, int], "dict[str, Tensor] | None"]

#: shift(module, call, delta) -> the output's derivative along the module's own parameter
#: change `delta` ({local name: tensor}); exact for modules whose output is affine in their
#: parameters, so per-row points θ + s_r·Δθ cost one more layer evaluation.
LayerShift = Callable[[nn.Module, Call, "dict[str, Tensor]"], "Tensor | None"]

_RULES: dict[type, LayerRule] = {}
_SHIFTS: dict[type, LayerShift] = {}
#: classes whose rule sums over every dim between the rows and the last (Linear, Embedding): a
#: call over G groups of rows may be handed to it folded, the groups' tokens side by side
_FOLDS: set[type] = set()


def register_layer_rule(
    *classes: type, shift: LayerShift | None = None, fold: bool = False
) -> Callable[[LayerRule], LayerRule]:
    """Function decorator: `rule(module, call, rows)` gives per-row gradients for `classes`;
    `shift` (optional) the output's derivative along a parameter change (see LayerShift);
    `fold`: the rule sums over its first input's and output gradient's dims between the rows
    and the last (tokens; all of an index input's), so G groups of rows may be summed by one
    call with G times the tokens (capture.py)."""

    def deco(fn: LayerRule) -> LayerRule:
        for c in classes:
            _RULES[c] = fn
            if shift is not None:
                _SHIFTS[c] = shift
            if fold:
                _FOLDS.add(c)
        return fn

    return deco


#: rules of classes from optional packages, by qualified name: bound to the class the first
#: time a module of it is looked up, so the kernel never imports those packages itself
_BY_NAME: dict[str, tuple[LayerRule, LayerShift | None, bool]] = {}


def register_layer_rule_by_name(
    qualname: str, rule: LayerRule, *, shift: LayerShift | None = None, fold: bool = False
) -> None:
    """Register `rule` (and `shift`, `fold` as for `register_layer_rule`) for the class named
    `qualname` ("package.module.Class") without importing it; a rule registered for the class
    itself wins."""
    _BY_NAME[qualname] = (rule, shift, fold)


def _bind(cls: type) -> None:
    if cls in _RULES:
        return
    entry = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if entry is not None:
        _RULES[cls] = entry[0]
        if entry[1] is not None:
            _SHIFTS[cls] = entry[1]
        if entry[2]:
            _FOLDS.add(cls)


def layer_shift_for(module: nn.Module) -> LayerShift | None:
    """The shift registered for exactly `type(module)`, or None."""
    _bind(type(module))
    return _SHIFTS.get(type(module))


def layer_rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for exactly `type(module)`, or None."""
    _bind(type(module))
    return _RULES.get(type(module))


def layer_folds(module: nn.Module) -> bool:
    """Whether the rule of exactly `type(module)` accepts folded groups (see `fold`)."""
    _bind(type(module))
    return type(module) in _FOLDS


def registered_layers() -> list[str]:
    """Qualified names of the module classes that have a closed-form rule."""
    return sorted({f"{c.__module__}.{c.__qualname__}" for c in _RULES} | set(_BY_NAME))


def rows_first(t: Any, rows: int) -> bool:
    """True when `t` is a tensor whose leading dim holds the `rows`."""
    return isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == rows


def tensor_leaves(value: Any) -> list[Tensor]:
    """Tensor leaves of a module output (tensor / tuple / list / dict), in tree order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in tensor_leaves(v)]
    if isinstance(value, dict):
        return [leaf for k in value for leaf in tensor_leaves(value[k])]
    return []


def replace_leaves(value: Any, new: list[Tensor]) -> Any:
    """`value` with its tensor leaves replaced, in order, by `new` (consumed from the front)."""
    if isinstance(value, Tensor):
        return new.pop(0)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(replace_leaves(v, new) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(replace_leaves(v, new) for v in value)
    if isinstance(value, dict):
        items = {k: replace_leaves(v, new) for k, v in value.items()}
        if type(value) is dict:
            return items
        # a dict subclass (a Hugging Face ModelOutput, an OrderedDict): the same type, so the
        # caller still reads `out.logits`; its items are set on a shallow copy
        out = copy.copy(value)
        for k, v in items.items():
            out[k] = v
        return out
    return value
