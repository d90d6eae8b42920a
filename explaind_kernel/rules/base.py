"""Optimizer rules: the backward recursion of the adjoint for one optimizer class.

An optimizer is a linear map of its gradient "sources" once its nonlinear state (Adam's second
moment, the step count) is taken as recorded (docs/design.md §2). A rule turns the integrated
Jacobian J̄_t of one parameter tensor into

* the adjoint with respect to the gradient recorded at step t (`z_grad`), so that a training
  sample's kernel value is ⟨z_grad, J(x_i)ᵀ c_i⟩,
* the weight-decay contribution of step t,
* the reconstructed update Δθ̂_t (the residual Δθ_t − Δθ̂_t is reported, never hidden),
* the adjoint carried to step t−1 through the optimizer's momentum state.

A rule whose recursion is elementwise-linear (Adam, SGD) says so by `linear`: per parameter
tensor, the coefficients of one step (`LinearStep`). The sweep then runs every tensor at once
over one flat [R, P] buffer (adjoints.py); `backward` applies the same coefficients to one tensor.
A rule that is not of that form overrides `backward` instead.

Rules are registered per optimizer class with `@register_rule(cls)`, which is the one
registration of an optimizer: it also registers the class for recording and replay in
`explaind_trace`'s optimizer registry, whose entry holds the rule. Resolution follows the
class's MRO there, so a subclass of a supported optimizer reuses its parent's rule (and is
replayed as its parent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from explaind_trace.optimizers import kernel_rule, optimizer_class_by_name, register_optimizer


@dataclass
class ParamStep:
    """What a rule sees of one parameter tensor at step t (all tensors in compute dtype)."""

    name: str
    jbar: Tensor | None  # [R, *shape] integrated Jacobian of the explained rows (None: `linear`)
    theta: Tensor  # θ_t
    delta: Tensor  # Δθ_t = θ_{t+1} − θ_t
    grad: Tensor | None  # gradient recorded at step t (None: the optimizer skipped this tensor)
    hp: dict[str, Any]  # the group's hyperparameters used at step t
    state_before: dict[str, Any]
    state_after: dict[str, Any]


@dataclass
class RuleOutput:
    """A rule's answer for one parameter tensor at step t."""

    z_grad: Tensor | None  # [R, *shape] adjoint w.r.t. the recorded gradient
    weight_decay: Tensor  # [R] weight-decay contribution of step t
    recon: Tensor  # Δθ̂_t, [*shape]
    carry: Tensor | None  # adjoint w.r.t. the momentum state before step t


@dataclass
class LinearStep:
    """Step t of one parameter tensor as elementwise coefficients (each a float or a tensor
    shaped like the parameter), with J̄ the integrated Jacobian and `carry` the adjoint
    carried from step t+1 (zero when there is none):

        λ = carry + a ⊙ J̄            (carry_in=False: λ = a ⊙ J̄)
        z = c·λ + e·J̄                 the adjoint w.r.t. the recorded gradient
        carry_out = f·λ               (f None: no carry out)
        weight decay = ⟨J̄, u⟩ + ⟨z, w⟩ per row (u, w None: no such term);  Δθ̂ = recon

    `skipped`: the optimizer did not touch the tensor (no gradient): no z, no terms, the carry
    passes through unchanged.
    """

    a: Tensor | float
    c: float
    recon: Tensor
    e: float = 0.0
    f: float | None = None
    u: Tensor | None = None
    w: Tensor | None = None
    carry_in: bool = True
    skipped: bool = False

    @classmethod
    def skip(cls, theta: Tensor) -> LinearStep:
        """The step of a tensor the optimizer skipped."""
        return cls(0.0, 0.0, torch.zeros_like(theta), f=1.0, skipped=True)


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a_r, b⟩ for every row r of a [R, *shape] against b [*shape] → [R]."""
    return a.reshape(a.shape[0], -1) @ b.reshape(-1)


def row_products(a: Tensor, cols: Tensor) -> Tensor:
    """[R, k] the products of a [R, N] with a few columns `cols` [N, k], as (colsᵀ·aᵀ)ᵀ: the
    BLAS reads the long axis contiguously that way (on a 2-core EPYC, a [800, 8281] block
    times 2–5 columns ran 2.5–3.5 times faster than a @ cols, one column alike)."""
    return (cols.T.contiguous() @ a.T).T


class OptimizerRule:
    """The adjoint recursion of one optimizer family."""

    #: name of the optimizer-state tensor the carry is the adjoint of (momentum)
    state_key: str | None = None

    def linear(self, p: ParamStep) -> LinearStep | None:
        """The coefficients of step t for one tensor (`p.jbar` is not read), or None when the
        rule is not elementwise-linear (it overrides `backward` then)."""
        return None

    def backward(self, p: ParamStep, carry: Tensor | None) -> RuleOutput:
        """Process step t (sweeping backward), given the adjoint carried from step t+1: the
        coefficients of `linear` applied to this tensor's rows."""
        lin = self.linear(p)
        if lin is None:
            raise NotImplementedError(
                f"{type(self).__name__} defines neither linear() nor backward(): an optimizer "
                "rule overrides one of them"
            )
        jbar = p.jbar
        if jbar is None:
            raise ValueError("backward needs the rows' integrated Jacobian (ParamStep.jbar)")
        zero = jbar.new_zeros(jbar.shape[0])
        if lin.skipped:
            return RuleOutput(None, zero, lin.recon, carry)
        if carry is not None and lin.carry_in:
            lam = torch.addcmul(carry, jbar, _coef(lin.a, jbar))
        else:
            lam = jbar * lin.a
        z = lam * lin.c
        if lin.e != 0.0:
            z = z + lin.e * jbar
        decay = zero
        if lin.u is not None:
            decay = decay + row_dot(jbar, lin.u)
        if lin.w is not None:
            decay = decay + row_dot(z, lin.w)
        return RuleOutput(z, decay, lin.recon, lam.mul_(lin.f) if lin.f is not None else None)

    def initial_state_term(
        self, carry: Tensor | None, state_before: dict[str, Any], rows: int, like: Tensor
    ) -> Tensor:
        """[R] contribution of the optimizer state that existed before the first traced step."""
        zero = torch.zeros(rows, dtype=like.dtype, device=like.device)
        if carry is None or self.state_key is None:
            return zero
        buf = state_before.get(self.state_key)
        if not isinstance(buf, Tensor):
            return zero
        return row_dot(carry, buf.to(carry.dtype))


def _coef(a: Tensor | float, like: Tensor) -> Tensor:
    return a if isinstance(a, Tensor) else torch.tensor(a, dtype=like.dtype, device=like.device)


_RULES: dict[type, OptimizerRule] = {}  # the rules this package registered (for listing)


def register_rule(optimizer_cls: type) -> Callable[[type[OptimizerRule]], type[OptimizerRule]]:
    """Class decorator: the one registration of an optimizer class (and its subclasses).

    Registers the `OptimizerRule` subclass as the kernel's adjoint rule for `optimizer_cls`
    and, in the same entry of `explaind_trace`'s optimizer registry, the class for recording
    and replay.
    """

    def deco(rule_cls: type[OptimizerRule]) -> type[OptimizerRule]:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, OptimizerRule)):
            raise TypeError(f"register_rule decorates an OptimizerRule subclass, got {rule_cls!r}")
        if rule_cls.linear is OptimizerRule.linear and rule_cls.backward is OptimizerRule.backward:
            raise TypeError(
                f"{rule_cls.__qualname__} defines neither linear() nor backward(): an optimizer "
                "rule overrides one of them"
            )
        rule = rule_cls()
        register_optimizer(optimizer_cls, rule=rule)  # TypeError for a non-optimizer class
        _RULES[optimizer_cls] = rule
        return rule_cls

    return deco


def registered_rules() -> list[str]:
    """Qualified names of the optimizer classes that have a rule."""
    return sorted(f"{c.__module__}.{c.__qualname__}" for c in _RULES)


def rule_for(optimizer_cls: type) -> OptimizerRule:
    """The rule of the registered class `optimizer_cls` is replayed as (itself or its nearest
    registered base); `UnsupportedOptimizerError` listing what is registered otherwise."""
    return kernel_rule(optimizer_cls)


def rule_for_trace(class_name: str, rule: str | None = None) -> OptimizerRule:
    """The rule of the optimizer a trace names (``TraceMeta.optimizer.class_name`` and
    ``.rule``): the class replay uses, and its rule; one `UnsupportedOptimizerError` if
    either is not registered."""
    return kernel_rule(optimizer_class_by_name(class_name, rule))
