"""The model: GPT-2 from a transformers config with random initialisation (nothing
downloaded), and its parameters grouped by transformer block for the per-layer views."""

from __future__ import annotations

from typing import Any

import torch

from .corpus import Language


def gpt2_config(language: Language, *, layers: int, d_model: int, heads: int, dropout: float):
    """A tiny GPT2Config for `language` (context = the language's context length)."""
    import transformers

    return transformers.GPT2Config(
        vocab_size=language.vocab_size,
        n_positions=language.context,
        n_embd=d_model,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=language.bos,
        eos_token_id=language.eos,
        pad_token_id=language.pad,
        # no key/value cache (nothing here generates): the Trainer trains without one, and a
        # replay with one ran attention on contiguous copies of K and V instead of views of
        # the fused projection, which on an AVX-512 CPU rounded differently in the last bits
        use_cache=False,
    )


def build_model(config: Any, seed: int) -> torch.nn.Module:
    """GPT2LMHeadModel(config) with the seeded random initialisation (tied lm_head)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def block_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter tensors by layer: embeddings (tokens, tied to lm_head; positions), each
    transformer block, the final LayerNorm. Together they partition the parameters."""
    groups: dict[str, list[str]] = {"embeddings": []}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["transformer", "h"]:
            groups.setdefault(f"block {parts[2]}", []).append(name)
        elif parts[1] in ("wte", "wpe"):
            groups["embeddings"].append(name)
        else:
            groups.setdefault("final norm", []).append(name)
    return groups
