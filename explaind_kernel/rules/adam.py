"""Adam, AdamW (decoupled decay) and amsgrad, with PyTorch's semantics.

    s_t = ±g_t (+ wd·θ_t, coupled)    m_t = β1·m_{t−1} + (1−β1)·s_t
    D_t = 1 / (sqrt(v̂_t) / sqrt(1−β2^k) + eps)     (v̂: v, or its running max with amsgrad)
    Δθ_t = −(lr/(1−β1^k))·D_t ⊙ m_t  (− lr·wd·θ_t, decoupled)

Backward: λ_t = −(lr/(1−β1^k))·D_t ⊙ J̄_t + carry,  z_s = (1−β1)·λ_t,  carry_{t−1} = β1·λ_t.
"""

from __future__ import annotations

import math

import torch

from .base import LinearStep, OptimizerRule, ParamStep, register_rule


def _step_count(state: dict) -> float:
    step = state.get("step")
    return float(step.item() if isinstance(step, torch.Tensor) else step)


@register_rule(torch.optim.Adam)
class AdamRule(OptimizerRule):
    """Adam (decoupled weight decay when the group says ``decoupled_weight_decay``)."""

    state_key = "exp_avg"
    decoupled = False  # AdamW: always decoupled

    def linear(self, p: ParamStep) -> LinearStep:
        if p.grad is None:  # the optimizer skipped this tensor: state unchanged, no update
            return LinearStep.skip(p.theta)
        hp = p.hp
        beta1, beta2 = (float(b) for b in hp["betas"])
        lr, eps, wd = float(hp["lr"]), float(hp["eps"]), float(hp["weight_decay"])
        decoupled = self.decoupled or bool(hp.get("decoupled_weight_decay", False))
        sign = -1.0 if hp.get("maximize", False) else 1.0
        k = _step_count(p.state_after)
        bc1 = 1.0 - beta1**k
        bc2_sqrt = math.sqrt(1.0 - beta2**k)
        key = "max_exp_avg_sq" if hp.get("amsgrad", False) else "exp_avg_sq"
        dtype = p.theta.dtype
        v = p.state_after[key].to(dtype)
        d = 1.0 / (v.sqrt() / bc2_sqrt + eps)
        scale = d.mul_(-lr / bc1)  # λ = carry − step·D ⊙ J̄
        recon = scale * p.state_after["exp_avg"].to(dtype)
        u = w = None
        if wd != 0.0:
            if decoupled:
                u = -lr * wd * p.theta
                recon = recon - lr * wd * p.theta
            else:
                w = sign * wd * p.theta
        return LinearStep(scale, sign * (1.0 - beta1), recon, f=beta1, u=u, w=w)


@register_rule(torch.optim.AdamW)
class AdamWRule(AdamRule):
    """AdamW, registered by itself: AdamW subclasses Adam (with ``decoupled_weight_decay``
    set) only in recent torch; before that it is its own class without that key."""

    decoupled = True
