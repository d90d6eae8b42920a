"""Tiny models for the kernel tests: one table of named setups the cross-cutting tests iterate."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 4, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BNConvNet(nn.Module):
    """conv → batch norm → ReLU → pool → linear, on 1×8×8 images."""

    def __init__(self, width: int = 4, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


class TinyTransformer(nn.Module):
    """One attention block + MLP, dropout on the residual stream, logits at the last token."""

    def __init__(self, vocab: int = 7, d: int = 16, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab + 1, d)
        self.pos = nn.Parameter(torch.randn(3, d) / math.sqrt(d))
        self.heads, self.dh = heads, d // heads
        self.W_Q = nn.Linear(d, d, bias=False)
        self.W_K = nn.Linear(d, d, bias=False)
        self.W_V = nn.Linear(d, d, bias=False)
        self.W_O = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)
        self.unembed = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        b, n, d = x.shape
        q = self.W_Q(x).view(b, n, self.heads, self.dh).transpose(1, 2)
        k = self.W_K(x).view(b, n, self.heads, self.dh).transpose(1, 2)
        v = self.W_V(x).view(b, n, self.heads, self.dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)
        x = x + self.drop(self.W_O((att @ v).transpose(1, 2).reshape(b, n, d)))
        x = x + self.drop(self.mlp(x))
        return self.unembed(x[:, -1])


@dataclass
class KernelSetup:
    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    make_opt: Callable[[nn.Module], torch.optim.Optimizer]
    steps: int = 200
    batch: int = 8


def _mlp_data(g):
    x = torch.randn(32, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), torch.randn(3, 4, generator=g)


def _img_data(g):
    x = torch.randn(32, 1, 8, 8, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long(), torch.randn(3, 1, 8, 8, generator=g)


def _tok_data(g):
    a = torch.randint(0, 7, (32,), generator=g)
    b = torch.randint(0, 7, (32,), generator=g)
    x = torch.stack([a, b, torch.full_like(a, 7)], 1)
    t = torch.randint(0, 7, (3, 2), generator=g)
    return x, (a + b) % 7, torch.cat([t, torch.full((3, 1), 7)], 1)


SETUPS = [
    KernelSetup(
        "mlp_adamw",
        MLP,
        _mlp_data,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    ),
    KernelSetup(
        "cnn_bn_sgd",
        BNConvNet,
        _img_data,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
    ),
    KernelSetup(
        "transformer_dropout_adamw",
        TinyTransformer,
        _tok_data,
        lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1.0, betas=(0.9, 0.98)),
    ),
]


def train(
    setup: KernelSetup,
    store: str,
    *,
    seed: int = 0,
    l2: float = 0.0,
    clip: float | None = None,
    checkpoint_every: int = 50,
    **record_kw,
):
    """Train `setup` under explaind_trace.record; returns (fresh model of the arch, test inputs)."""
    import explaind_trace

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = setup.make_model()
    fresh = setup.make_model()
    x, y, test_x = setup.make_data(g)
    opt = setup.make_opt(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    with explaind_trace.record(
        model, opt, store=store, checkpoint_every=checkpoint_every, **record_kw
    ):
        for _ in range(setup.steps):
            idx = torch.randperm(len(x), generator=g)[: setup.batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if l2:
                loss = loss + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
    return fresh, test_x, model


class TokenLM(nn.Module):
    """Embedding, a causal mix of the previous token, a vocabulary head: [B, T, V]."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        return self.head(torch.tanh(self.mix(torch.cat([h, prev], -1))))
