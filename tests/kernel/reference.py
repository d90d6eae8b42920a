"""A slow, obviously-correct float64 reference of the path kernel.

It shares no code with explaind_kernel. It trains a tiny model with a real torch optimizer
(recorded by explaind_trace, so the engine can read the same run), and alongside, forward in
time, keeps one momentum buffer *per training sample* (and per source step), as upstream does:

    m^{(i)}_t = β1·m^{(i)}_{t−1} + (1−β1)·s^{(i)}_t           (Adam)
    buf^{(i)}_t = μ·buf^{(i)}_{t−1} + (1−d)·s^{(i)}_t          (SGD; buf_0 = s_0)

so that Δθ_t = Σ_i Δθ^{(i)}_t + decay + non-data parts, and a sample's contribution is
Σ_t J̄_t · Δθ^{(i)}_t, with J̄_t from autograd Jacobians at Gauss–Legendre nodes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

import explaind_trace


@dataclass
class Setup:
    name: str
    make_opt: Callable[[list[dict]], torch.optim.Optimizer]
    steps: int = 10
    batch: int = 4
    samples: int = 12
    l2: float = 0.0  # explicit L2 term written into the loss (a non-data gradient)
    clip: float | None = None  # gradient-norm clipping (a non-data correction)
    scheduler: bool = True
    seed: int = 0


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def groups_of(model: nn.Module, lr2: float = 0.05, wd2: float | None = None) -> list[dict]:
    g2 = {"params": list(model.fc2.parameters()), "lr": lr2}
    if wd2 is not None:
        g2["weight_decay"] = wd2
    return [{"params": list(model.fc1.parameters())}, g2]


@dataclass
class Reference:
    names: list[str]
    f0: np.ndarray  # [N, O]
    fT: np.ndarray
    data: dict[str, np.ndarray]  # sample id -> [N, O]
    step_data: np.ndarray  # [N, O, T] by source step
    component_data: dict[str, np.ndarray]  # param -> [N, O]
    weight_decay: np.ndarray
    nondata: np.ndarray
    residual: np.ndarray
    quadrature_error: np.ndarray
    extra: dict = field(default_factory=dict)


def run_setup(
    setup: Setup,
    store: str,
    test_x: torch.Tensor,
    nodes: int = 2,
    target: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Train under explaind_trace.record and compute the reference. Returns (model0, reference).

    target: what is explained, a function of the model output [N, C] (e.g. a per-input loss
    closed over the test labels); None: every output."""
    torch.manual_seed(setup.seed)
    model = TinyMLP().double()
    model0 = copy.deepcopy(model)
    shadow = copy.deepcopy(model)  # no hooks: per-sample gradients for the reference
    opt = setup.make_opt(groups_of(model))
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + 0.1 * e))
        if setup.scheduler
        else None
    )
    gen = torch.Generator().manual_seed(setup.seed + 1)
    X = torch.randn(setup.samples, 3, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 3, (setup.samples,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    thetas, grads, per_sample, batches, hps, states = [], [], [], [], [], []
    with explaind_trace.record(model, opt, store=store, checkpoint_every=4) as rec:
        for _t in range(setup.steps):
            idx = torch.randperm(setup.samples, generator=gen)[: setup.batch]
            theta = {n: p.detach().clone() for n, p in params.items()}
            # per-sample gradients of loss_i / B, on a hook-free copy
            ps = []
            for i in idx.tolist():
                th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
                loss_i = (
                    nn.functional.cross_entropy(
                        functional_call(shadow, th, (X[i : i + 1],)), Y[i : i + 1]
                    )
                    / setup.batch
                )
                g = torch.autograd.grad(loss_i, [th[n] for n in names])
                ps.append((str(i), dict(zip(names, [x.detach() for x in g]))))
            opt.zero_grad()
            rec.set_sample_ids([str(i) for i in idx.tolist()])
            loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
            if setup.l2:
                loss = loss + 0.5 * setup.l2 * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            if setup.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), setup.clip)
            hp = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            group_of = {
                n: gi
                for gi, g in enumerate(opt.param_groups)
                for p in g["params"]
                for n in names
                if params[n] is p
            }
            thetas.append(theta)
            grads.append({n: params[n].grad.detach().clone() for n in names})
            per_sample.append(ps)
            batches.append(idx)
            hps.append([hp[group_of[n]] for n in names])
            opt.step()
            states.append(
                {
                    n: {
                        k: (v.detach().clone() if torch.is_tensor(v) else v)
                        for k, v in opt.state[params[n]].items()
                    }
                    for n in names
                }
            )
            if sched is not None:
                sched.step()
    thetas.append({n: p.detach().clone() for n, p in params.items()})
    f = _explained(target)
    ref = _reference(model0, names, thetas, grads, per_sample, hps, states, test_x, nodes, f)
    return model0, ref


def _explained(target):
    """The explained values [N, O] as a function of (model, θ, x)."""

    def f(model: nn.Module, theta: dict, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, theta, (x,))
        out = target(out) if target is not None else out
        return out.reshape(x.shape[0], -1)

    return f


def _jacobian(model: nn.Module, theta: dict, x: torch.Tensor, f) -> dict[str, torch.Tensor]:
    """{name: [N*O, *shape]} by plain autograd, one output row at a time."""
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    y = f(model, th, x).reshape(-1)
    rows = {k: [] for k in th}
    for r in range(y.numel()):
        g = torch.autograd.grad(y[r], list(th.values()), retain_graph=True, allow_unused=True)
        for k, gk in zip(th, g):
            rows[k].append(torch.zeros_like(th[k]) if gk is None else gk)
    return {k: torch.stack(v) for k, v in rows.items()}


def _dot(j: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    return (j.reshape(j.shape[0], -1) @ v.reshape(-1)).numpy()


def _reference(
    model0, names, thetas, grads, per_sample, hps, states, test_x, nodes, f
) -> Reference:
    T = len(grads)
    x = test_x.double()
    with torch.no_grad():
        f0 = f(model0, thetas[0], x).numpy()
        fT = f(model0, thetas[-1], x).numpy()
    N, O = f0.shape  # noqa: E741 (N inputs × O outputs, as in docs/design.md)
    R = N * O
    s_nodes, w_nodes = np.polynomial.legendre.leggauss(nodes)
    s_nodes, w_nodes = (s_nodes + 1) / 2, w_nodes / 2
    sample_ids = sorted({sid for ps in per_sample for sid, _ in ps}, key=int)
    # per-part momentum buffers: one per sample, one per source step, decay, non-data
    parts = (
        [("sample", s) for s in sample_ids]
        + [("step", tau) for tau in range(T)]
        + [("wd", 0), ("nd", 0)]
    )
    buf = {p: {n: torch.zeros_like(thetas[0][n]) for n in names} for p in parts}
    seen = {n: False for n in names}
    contrib = {p: np.zeros(R) for p in parts}
    comp_data = {n: np.zeros(R) for n in names}
    decoupled = np.zeros(R)
    residual = np.zeros(R)
    qerr = np.zeros(R)
    for t in range(T):
        th, nxt = thetas[t], thetas[t + 1]
        delta = {n: nxt[n] - th[n] for n in names}
        jbar = {n: torch.zeros(R, *th[n].shape, dtype=torch.float64) for n in names}
        for s, w in zip(s_nodes, w_nodes):
            j = _jacobian(model0, {n: th[n] + s * delta[n] for n in names}, x, f)
            for n in names:
                jbar[n] += w * j[n]
        with torch.no_grad():
            path = (f(model0, nxt, x) - f(model0, th, x)).reshape(-1).numpy()
        qerr += path - sum(_dot(jbar[n], delta[n]) for n in names)
        data_sum = {n: sum(g[n] for _, g in per_sample[t]) for n in names}
        recon = {n: torch.zeros_like(th[n]) for n in names}
        for k, n in enumerate(names):
            hp = hps[t][k]
            sign = -1.0 if hp.get("maximize", False) else 1.0
            wd = float(hp["weight_decay"])
            lr = float(hp["lr"])
            is_adam = "betas" in hp
            coupled = wd if (not is_adam or not hp.get("decoupled_weight_decay", False)) else 0.0
            src = {p: torch.zeros_like(th[n]) for p in parts}
            for sid, g in per_sample[t]:
                src[("sample", sid)] = src[("sample", sid)] + sign * g[n]
            src[("step", t)] = sign * data_sum[n]
            src[("wd", 0)] = coupled * th[n]
            src[("nd", 0)] = sign * (grads[t][n] - data_sum[n])
            if is_adam:
                b1, b2 = hp["betas"]
                st = states[t][n]
                k_ = float(st["step"])
                v = st["max_exp_avg_sq"] if hp.get("amsgrad", False) else st["exp_avg_sq"]
                D = 1.0 / (v.sqrt() / math.sqrt(1 - b2**k_) + hp["eps"])
                c = lr / (1 - b1**k_)
                for p in parts:
                    buf[p][n] = b1 * buf[p][n] + (1 - b1) * src[p]
                    dpart = -c * D * buf[p][n]
                    contrib[p] += _dot(jbar[n], dpart)
                    recon[n] += dpart
                    if p[0] == "sample":
                        comp_data[n] += _dot(jbar[n], dpart)
                if hp.get("decoupled_weight_decay", False) and wd:
                    dec = -lr * wd * th[n]
                    decoupled += _dot(jbar[n], dec)
                    recon[n] += dec
            else:
                mu, damp, nest = float(hp["momentum"]), float(hp["dampening"]), bool(hp["nesterov"])
                for p in parts:
                    if mu == 0.0:
                        u = src[p]
                    else:
                        buf[p][n] = (
                            src[p].clone() if not seen[n] else mu * buf[p][n] + (1 - damp) * src[p]
                        )
                        u = src[p] + mu * buf[p][n] if nest else buf[p][n]
                    dpart = -lr * u
                    contrib[p] += _dot(jbar[n], dpart)
                    recon[n] += dpart
                    if p[0] == "sample":
                        comp_data[n] += _dot(jbar[n], dpart)
            seen[n] = True
        residual += sum(_dot(jbar[n], delta[n] - recon[n]) for n in names)
    sh = (N, O)
    return Reference(
        names=names,
        f0=f0,
        fT=fT,
        data={sid: contrib[("sample", sid)].reshape(sh) for sid in sample_ids},
        step_data=np.stack([contrib[("step", tau)].reshape(sh) for tau in range(T)], axis=-1),
        component_data={n: comp_data[n].reshape(sh) for n in names},
        weight_decay=(contrib[("wd", 0)] + decoupled).reshape(sh),
        nondata=contrib[("nd", 0)].reshape(sh),
        residual=residual.reshape(sh),
        quadrature_error=qerr.reshape(sh),
    )
