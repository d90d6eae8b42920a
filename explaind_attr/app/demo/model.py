"""The modular-addition model of the grokking study, and its data.

A one-layer Transformer reads the three tokens ``(a, b, '=')`` (``'='`` is token ``p``) and
predicts ``(a + b) mod p`` from the logits at the last position: token and learned
positional embeddings, one attention block with ``n_heads`` heads and one ReLU MLP block,
both added to the residual stream (no layer norm, as in the grokking literature), then the
unembedding.

Attention uses separate bias-free ``W_Q``, ``W_K``, ``W_V``, ``W_O`` linear maps so that
heads can be sliced out of the weights (head h owns rows ``h*d_head:(h+1)*d_head`` of
``W_Q``/``W_K``/``W_V`` and the same columns of ``W_O``); `head_slices` names those slices
for ``explaind_kernel.compute_kernel(slices=...)`` and `component_groups` gathers the kernel
components into the study's parts (embeddings, heads, MLP, unembedding).

``examples/modular_addition/model.py`` re-exports this module (the library cannot import
``examples/``, and ``explaind demo`` trains this model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ModularAdditionTransformer", "component_groups", "head_slices", "make_dataset"]


class ModularAdditionTransformer(nn.Module):
    """Tokens ``[a, b, =]`` (``=`` is token ``p``) → logits over ``p`` residues at the last position."""

    def __init__(
        self, p: int, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512, dropout: float = 0.0
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.p, self.n_heads, self.d_head = p, n_heads, d_model // n_heads
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos = nn.Parameter(torch.randn(3, d_model) / d_model**0.5)
        self.W_Q = nn.Linear(d_model, d_model, bias=False)
        self.W_K = nn.Linear(d_model, d_model, bias=False)
        self.W_V = nn.Linear(d_model, d_model, bias=False)
        self.W_O = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.drop = nn.Dropout(dropout)
        self.unembed = nn.Linear(d_model, p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        q, k, v = self._heads(self.W_Q(x)), self._heads(self.W_K(x)), self._heads(self.W_V(x))
        t = tokens.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        scores = (q @ k.transpose(-1, -2)) / self.d_head**0.5
        attn = self.drop(scores.masked_fill(~mask, float("-inf")).softmax(-1))
        z = (attn @ v).transpose(1, 2).reshape(x.shape)
        x = x + self.W_O(z)
        x = x + self.drop(self.mlp_out(torch.relu(self.mlp_in(x))))
        return self.unembed(x[:, -1])


def make_dataset(
    p: int, train_fraction: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs ``(a, b, =) → (a + b) mod p``, split at random into train and test."""
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n = int(round(train_fraction * p * p))
    tr, te = perm[:n], perm[n:]
    return x[tr], y[tr], x[te], y[te]


def head_slices(model: ModularAdditionTransformer, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """``{name: (parameter name, index)}`` for every head's rows of W_Q/W_K/W_V and columns of W_O.

    Names look like ``head0.W_Q``; pass the dict as ``compute_kernel(..., slices=...)``.
    ``prefix`` is prepended to parameter names when the model sits inside another module.
    """
    out: dict[str, tuple[str, Any]] = {}
    for h in range(model.n_heads):
        rows = slice(h * model.d_head, (h + 1) * model.d_head)
        for proj in ("W_Q", "W_K", "W_V"):
            out[f"head{h}.{proj}"] = (f"{prefix}{proj}.weight", (rows, slice(None)))
        out[f"head{h}.W_O"] = (f"{prefix}W_O.weight", (slice(None), rows))
    return out


def component_groups(model: ModularAdditionTransformer) -> dict[str, list[str]]:
    """The study's components → the kernel component names (``result.component_names``) in each.

    embeddings (token + positional), one entry per attention head (its four slices from
    `head_slices`, which need ``slices=head_slices(model)``), mlp (both layers), unembed.
    Together they partition the model's parameters, so the groups add up to the whole change.
    """
    groups: dict[str, list[str]] = {"embeddings": ["embed.weight", "pos"]}
    for h in range(model.n_heads):
        groups[f"head{h}"] = [f"slice:head{h}.{proj}" for proj in ("W_Q", "W_K", "W_V", "W_O")]
    groups["mlp"] = ["mlp_in.weight", "mlp_in.bias", "mlp_out.weight", "mlp_out.bias"]
    groups["unembed"] = ["unembed.weight", "unembed.bias"]
    return groups
