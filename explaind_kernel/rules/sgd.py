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

from .base import OptimizerRule, ParamStep, RuleOutput, register_rule, row_dot


@register_rule(torch.optim.SGD)
class SGDRule(OptimizerRule):
    """torch.optim.SGD in all its options."""

    state_key = "momentum_buffer"

    def backward(self, p: ParamStep, carry: torch.Tensor | None) -> RuleOutput:
        rows = p.jbar.shape[0]
        if p.grad is None:
            return RuleOutput(None, p.jbar.new_zeros(rows), torch.zeros_like(p.theta), carry)
        hp = p.hp
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        mu, damp = float(hp.get("momentum", 0.0)), float(hp.get("dampening", 0.0))
        nesterov = bool(hp.get("nesterov", False))
        sign = -1.0 if hp.get("maximize", False) else 1.0
        grad = p.grad
        source = sign * grad + wd * p.theta if wd != 0.0 else sign * grad

        if mu == 0.0:
            z_s = -lr * p.jbar
            recon = -lr * source
            new_carry = None
        else:
            first = not isinstance(p.state_before.get("momentum_buffer"), torch.Tensor)
            lam = p.jbar * (-lr * (mu if nesterov else 1.0))
            if carry is not None:
                lam = lam + carry
            z_s = lam if first else (1.0 - damp) * lam
            if nesterov:
                z_s = z_s - lr * p.jbar
            buf = p.state_after["momentum_buffer"].to(p.jbar.dtype)
            recon = -lr * (source + mu * buf) if nesterov else -lr * buf
            new_carry = None if first else mu * lam
        decay = row_dot(z_s, wd * p.theta) if wd != 0.0 else p.jbar.new_zeros(rows)
        return RuleOutput(sign * z_s, decay, recon, new_carry)
