"""Small models, data and the table of optimizer setups shared by the trace tests."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import explaind_trace as et

_names = itertools.count()


def unique(prefix: str = "t") -> str:
    """A fresh name for an in-memory store."""
    return f"{prefix}-{next(_names)}"


class MLP(nn.Module):
    """Linear-BN-ReLU-Dropout-Linear: buffers and RNG in the forward."""

    def __init__(
        self, d_in: int = 6, d_hidden: int = 16, d_out: int = 3, bn: bool = True, p: float = 0.2
    ):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.bn = nn.BatchNorm1d(d_hidden) if bn else nn.Identity()
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def two_groups(model: MLP) -> list[dict[str, Any]]:
    """Two param groups with different lr and weight decay."""
    return [
        {
            "params": [*model.fc1.parameters(), *model.bn.parameters()],
            "lr": 0.05,
            "weight_decay": 0.01,
        },
        {"params": list(model.fc2.parameters()), "lr": 0.02, "weight_decay": 0.1},
    ]


def data(
    n: int = 48, d_in: int = 6, classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


@dataclass(frozen=True)
class Setup:
    """One named optimizer configuration for the cross-cutting tests."""

    name: str
    make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    schedule: Callable[[torch.optim.Optimizer], Any] = field(
        default=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    )
    accumulate: int = 1
    set_to_none: bool = True


SETUPS = [
    Setup("sgd", lambda g: torch.optim.SGD(g, lr=0.05)),
    Setup(
        "sgd-momentum-dampening",
        lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, dampening=0.3),
        set_to_none=False,
    ),
    Setup(
        "sgd-nesterov-wd",
        lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        schedule=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[0.1, 0.05], total_steps=40
        ),
    ),
    Setup("sgd-maximize", lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.5, maximize=True)),
    Setup("adam-wd", lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=1e-2), accumulate=2),
    Setup(
        "adamw",
        lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.98)),
        schedule=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[1e-2, 5e-3], total_steps=40
        ),
    ),
    Setup(
        "adamw-amsgrad", lambda g: torch.optim.AdamW(g, lr=1e-2, amsgrad=True), set_to_none=False
    ),
]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch: int = 8,
    accumulate: int = 1,
    set_to_none: bool = True,
    thetas: list[dict[str, torch.Tensor]] | None = None,
    validate: bool = False,
) -> None:
    """A plain loop: optional accumulation, scheduler, no_grad validation forwards."""
    n = x.shape[0]
    i = 0
    for _ in range(steps):
        if thetas is not None:
            thetas.append(snapshot(model))
        opt.zero_grad(set_to_none=set_to_none)
        for _ in range(accumulate):
            idx = torch.arange(i, i + batch) % n
            i += batch
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx]) / accumulate
            loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if validate:
            model.eval()
            with torch.no_grad():
                model(x[:batch])
            model.train()
    if thetas is not None:
        thetas.append(snapshot(model))


def train_with_skip(model: nn.Module, opt, scaler, x, y, store: str, **record_options: Any):
    """Five GradScaler steps recorded into ``store``, the third overflowing (an infinite loss,
    so the scaler skips that optimizer step); returns θ before each step and after the last."""
    thetas = []
    with et.record(model, opt, store=store, scaler=scaler, **record_options):
        for i in range(5):
            opt.zero_grad()
            thetas.append(snapshot(model))
            loss = nn.functional.cross_entropy(model(x[8 * i : 8 * i + 8]), y[8 * i : 8 * i + 8])
            if i == 2:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    thetas.append(snapshot(model))
    return thetas
