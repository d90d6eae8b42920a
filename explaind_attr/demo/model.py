"""The modular-addition model of the grokking study, and its data.

A one-layer Transformer reads the three tokens ``(a, b, '=')`` and predicts ``(a + b) mod p``
from the logits at the last position. Token and learned positional embeddings feed one
attention block with ``n_heads`` heads and one ReLU MLP block, both added to the residual
stream (no layer norm, as in the grokking literature), then the unembedding.

The attention projections are plain bias-free ``nn.Linear`` layers whose weight rows (W_Q,
W_K, W_V) and columns (W_O) are laid out head by head, so one head is a contiguous slice of
each: `head_slices` names those slices for ``explaind_kernel.compute_kernel(slices=...)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ModularAdditionTransformer",
    "component_groups",
    "head_slices",
    "make_dataset",
]


class ModularAdditionTransformer(nn.Module):
    """One-layer Transformer for ``(a + b) mod p``; input [B, 3] token ids, output [B, p] logits.

    Token ids are ``0 … p-1`` for the numbers and ``p`` for ``'='``.
    """

    def __init__(
        self,
        p: int,
        d_model: int = 128,
        n_heads: int = 4,
        d_mlp: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if p < 2:
            raise ValueError(f"p must be ≥ 2, got {p}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.p = p
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.seq_len = 3
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos_embed = nn.Embedding(self.seq_len, d_model)
        self.W_Q = nn.Linear(d_model, d_model, bias=False)
        self.W_K = nn.Linear(d_model, d_model, bias=False)
        self.W_V = nn.Linear(d_model, d_model, bias=False)
        self.W_O = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, p, bias=False)
        self.dropout = nn.Dropout(dropout)
        mask = torch.tril(torch.ones(self.seq_len, self.seq_len, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings N(0, 1/d_model); linear maps N(0, 1/fan_in); MLP biases zero."""
        d_model = self.embed.embedding_dim
        for emb in (self.embed, self.pos_embed):
            nn.init.normal_(emb.weight, std=1.0 / math.sqrt(d_model))
        for lin in (self.W_Q, self.W_K, self.W_V, self.W_O, self.mlp_in, self.mlp_out, self.unembed):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
        nn.init.zeros_(self.mlp_in.bias)
        nn.init.zeros_(self.mlp_out.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.n_heads, self.d_head).transpose(1, 2)  # [B, H, S, d_head]

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        resid = self.embed(tokens) + self.pos_embed(positions)  # [B, S, d_model]
        q, k, v = self._heads(self.W_Q(resid)), self._heads(self.W_K(resid)), self._heads(self.W_V(resid))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        s = tokens.shape[1]
        scores = scores.masked_fill(~self.causal_mask[:s, :s], float("-inf"))
        z = scores.softmax(dim=-1) @ v  # [B, H, S, d_head]
        z = z.transpose(1, 2).reshape(resid.shape)
        resid = resid + self.dropout(self.W_O(z))
        resid = resid + self.dropout(self.mlp_out(torch.relu(self.mlp_in(resid))))
        return self.unembed(resid[:, -1])


def make_dataset(p: int, train_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All p² pairs ``(a, b, '=')`` → ``(a + b) mod p``, split at random.

    Returns (train_x [n, 3] long, train_y [n] long, test_x, test_y); the split is a
    permutation drawn from ``torch.Generator().manual_seed(seed)``.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = max(1, min(p * p - 1, int(round(train_fraction * p * p))))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


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
    """The study's components → the kernel component names that make them up.

    embeddings (token + positional), one entry per attention head (its four slices), mlp
    (both layers with biases), unembedding. Heads use the slice names of `head_slices`.
    """
    groups: dict[str, list[str]] = {"embeddings": ["embed.weight", "pos_embed.weight"]}
    for h in range(model.n_heads):
        groups[f"head{h}"] = [f"slice:head{h}.{proj}" for proj in ("W_Q", "W_K", "W_V", "W_O")]
    groups["mlp"] = ["mlp_in.weight", "mlp_in.bias", "mlp_out.weight", "mlp_out.bias"]
    groups["unembed"] = ["unembed.weight"]
    return groups
