"""Optimizer support: one registry, keyed by class and resolved along the MRO, that covers
recording, replay and the kernel's adjoint rule.

Replay builds a fresh optimizer of the recorded class, so only classes registered here are
ever instantiated; a class name read from a trace is looked up in the registry, never
imported. Each entry also has a slot for the kernel's adjoint rule: ``explaind_kernel``'s
``register_rule(cls)`` fills it (and registers ``cls`` here), so one registration makes an
optimizer recordable, replayable and explainable. Imports go one way: the kernel calls in,
this module never imports the kernel; the rule is held as an opaque object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import UnsupportedOptimizerError

__all__ = [
    "OptimizerSupport",
    "register_optimizer",
    "resolve_optimizer",
    "support_for",
    "kernel_rule",
    "kernel_rules_loaded",
    "supported_optimizers",
    "optimizer_class_by_name",
    "qualified_name",
    "capture_hyperparams",
    "restore_hyperparams",
    "export_state",
    "load_state",
]

logger = logging.getLogger(__name__)

OptT = TypeVar("OptT", bound=type)


@dataclass(frozen=True)
class OptimizerSupport:
    """What is registered for one optimizer class: recording and replay always; ``rule``,
    the kernel's adjoint rule (an ``explaind_kernel.OptimizerRule``), once the kernel
    registered one."""

    cls: type
    rule: Any = None

    @property
    def what(self) -> str:
        return "record, replay, kernel" if self.rule is not None else "record, replay"


_REGISTRY: dict[type, OptimizerSupport] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_optimizer(cls: OptT, *, rule: Any = None) -> OptT:
    """Register an optimizer class (usable as a decorator) for recording and replay.

    A registered optimizer must be deterministic given its parameters, gradients, param
    groups and ``state_dict``: replay rebuilds it from exactly those. ``rule`` is the
    kernel's adjoint rule for it; ``explaind_kernel.register_rule`` passes it, so use that
    to register an optimizer the kernel should explain. Registering a class again keeps
    its rule unless a new one is given.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"register_optimizer needs a torch.optim.Optimizer subclass, got {cls!r}")
    old = _REGISTRY.get(cls)
    if rule is None and old is not None:
        rule = old.rule
    _REGISTRY[cls] = OptimizerSupport(cls, rule)
    return cls


# the kernel fills in their rules when it is imported (explaind_kernel/rules)
for _cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
    register_optimizer(_cls)


def supported_optimizers() -> list[str]:
    """Qualified names of the registered optimizer classes."""
    return sorted(qualified_name(c) for c in _REGISTRY)


def unsupported(what: str, missing: str = "support") -> UnsupportedOptimizerError:
    """The one error for an optimizer without (complete) registered support."""
    registered = "; ".join(
        f"{qualified_name(c)} ({s.what})"
        for c, s in sorted(_REGISTRY.items(), key=lambda kv: qualified_name(kv[0]))
    )
    if not kernel_rules_loaded():
        registered += " (kernel rules are added when explaind_kernel is imported)"
    return UnsupportedOptimizerError(
        f"{what} is not supported: no {missing} is registered for it. ExPLAIND needs one "
        "registration per optimizer class, covering recording, replay and the kernel's "
        f"adjoint rule. Registered: {registered}. To add one, write an "
        "explaind_kernel.OptimizerRule for it and register it with "
        "@explaind_kernel.register_rule(YourOptimizer), which registers recording and replay "
        "too; explaind_trace.register_optimizer(YourOptimizer) registers recording and replay "
        "only (for an optimizer that is deterministic given its parameters, gradients, param "
        "groups and state_dict)."
    )


def kernel_rules_loaded() -> bool:
    """Whether the kernel has registered its rules (explaind_kernel is imported)."""
    return any(s.rule is not None for s in _REGISTRY.values())


def support_for(cls: type) -> OptimizerSupport:
    """The registration ``cls`` uses: its own, or its nearest registered base class's."""
    for base in cls.__mro__:
        support = _REGISTRY.get(base)
        if support is not None:
            return support
    raise unsupported(f"optimizer {qualified_name(cls)}")


def resolve_optimizer(cls: type) -> type:
    """The registered class ``cls`` is replayed as (itself or its nearest registered base)."""
    return support_for(cls).cls


def kernel_rule(cls: type) -> Any:
    """The kernel's adjoint rule for ``cls``: the rule of the class it is replayed as."""
    support = support_for(cls)
    if support.rule is None:
        name = qualified_name(cls)
        if support.cls is not cls:
            name += f" (replayed as {qualified_name(support.cls)})"
        raise unsupported(f"optimizer {name}", "kernel rule")
    return support.rule


def optimizer_class_by_name(name: str, rule: str | None = None) -> type:
    """The registered class a trace names; only registered classes are ever returned.

    ``name`` is the class used in training and ``rule`` the registered class it resolved
    to when recording started. An unregistered subclass replays as its registered base
    (with a warning: register the subclass itself if it changes the update).
    """
    by_name = {qualified_name(c): c for c in _REGISTRY}
    if name in by_name:
        return by_name[name]
    if rule is not None and rule in by_name:
        logger.warning(
            "optimizer class %s is not registered; replaying it as its registered base %s "
            "(register %s with explaind_kernel.register_rule if it changes the update)",
            name,
            rule,
            name,
        )
        return by_name[rule]
    raise unsupported(f"the traced optimizer class {name!r}")


def _plain(value: Any) -> tuple[Any, str | None]:
    """A msgpack-able hyperparameter value and, for tensors, their dtype name."""
    if isinstance(value, torch.Tensor):
        return float(value.item()), str(value.dtype).removeprefix("torch.")
    if isinstance(value, tuple | list):
        items = [_plain(v) for v in value]
        dtypes = {d for _, d in items if d is not None}
        return [v for v, _ in items], (dtypes.pop() if dtypes else None)
    if value is None or isinstance(value, bool | int | float | str):
        return value, None
    return None, "skip"


def capture_hyperparams(group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Plain hyperparameters of a param group (no ``params``) and which keys were tensors."""
    values: dict[str, Any] = {}
    tensor_keys: dict[str, str] = {}
    for key, value in group.items():
        if key == "params":
            continue
        plain, dtype = _plain(value)
        if dtype == "skip":
            logger.debug("hyperparameter %r of type %s is not recorded", key, type(value))
            continue
        values[key] = plain
        if dtype is not None:
            tensor_keys[key] = dtype
    return values, tensor_keys


def restore_hyperparams(
    group: dict[str, Any], values: dict[str, Any], tensor_keys: dict[str, str] | None = None
) -> None:
    """Set a live param group's hyperparameters from recorded values."""
    tensor_keys = tensor_keys or {}
    for key, value in values.items():
        if key in tensor_keys:
            dtype = getattr(torch, tensor_keys[key])
            if isinstance(value, list):
                value = tuple(torch.tensor(v, dtype=dtype) for v in value)
            else:
                value = torch.tensor(value, dtype=dtype)
        elif key == "betas" and isinstance(value, list):
            value = tuple(value)
        group[key] = value


def export_state(
    optimizer: torch.optim.Optimizer, names: dict[int, str], *, copy: bool = True
) -> dict[str, dict[str, Any]]:
    """Optimizer state keyed by parameter name (tensors cloned to CPU when ``copy``)."""
    out: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st or id(p) not in names:
                continue
            entry: dict[str, Any] = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    entry[k] = v.detach().to("cpu", copy=True) if copy else v
                elif v is None or isinstance(v, bool | int | float | str):
                    entry[k] = v
            out[names[id(p)]] = entry
    return out


def load_state(
    optimizer: torch.optim.Optimizer, state: dict[str, dict[str, Any]], order: list[str]
) -> None:
    """Load name-keyed state into ``optimizer`` through ``load_state_dict``.

    ``order`` lists the parameter names in the optimizer's param-group order.
    """
    sd = optimizer.state_dict()
    index = {name: i for i, name in enumerate(order)}
    # load_state_dict deep-copies the state, so the caller's tensors are never aliased
    sd["state"] = {index[name]: dict(st) for name, st in state.items() if name in index}
    optimizer.load_state_dict(sd)
