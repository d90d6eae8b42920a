"""SGD with momentum, dampening, nesterov, weight decay and maximize (PyTorch semantics).

    s_t = ±g_t + wd·θ_t
    buf_t = s_t (first step) | μ·buf_{t−1} + (1−d)·s_t
    u_t = s_t + μ·buf_t (nesterov) | buf_t (momentum) | s_t (μ = 0);   Δθ_t = −lr·u_t

Backward with carry = ∂F_{>t}/∂buf_t:
    λ_t = −lr·(μ if nesterov else 1)·J̄_t + carry
    z_s = −lr·J̄_t·[nesterov] + λ_t·(1 if first else 1−d),   carry_{t−1} = μ·λ_t (0 if first)
"""

from __future__ import annotations

import torch

from .base import LinearStep, OptimizerRule, ParamStep, register_rule


@register_rule(torch.optim.SGD)
class SGDRule(OptimizerRule):
    """torch.optim.SGD in all its options."""

    state_key = "momentum_buffer"

    def linear(self, p: ParamStep) -> LinearStep:
        if p.grad is None:
            return LinearStep.skip(p.theta)
        hp = p.hp
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        mu, damp = float(hp.get("momentum", 0.0)), float(hp.get("dampening", 0.0))
        nesterov = bool(hp.get("nesterov", False))
        sign = -1.0 if hp.get("maximize", False) else 1.0
        source = sign * p.grad + wd * p.theta if wd != 0.0 else sign * p.grad
        w = sign * wd * p.theta if wd != 0.0 else None
        if mu == 0.0:  # no momentum state: z_s = −lr·J̄, nothing carried in or out
            return LinearStep(-lr, sign, -lr * source, w=w, carry_in=False)
        first = not isinstance(p.state_before.get("momentum_buffer"), torch.Tensor)
        buf = p.state_after["momentum_buffer"].to(p.theta.dtype)
        recon = -lr * (source + mu * buf) if nesterov else -lr * buf
        return LinearStep(
            -lr * (mu if nesterov else 1.0),
            sign * (1.0 if first else 1.0 - damp),
            recon,
            e=-sign * lr if nesterov else 0.0,
            f=None if first else mu,
            w=w,
        )
