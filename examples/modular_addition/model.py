"""One-layer Transformer for modular addition (a + b mod p), and its data.

The model lives in the library (``explaind_attr.app.demo.model``) because ``explaind demo``
trains it and the library cannot import ``examples/``; this module re-exports it so the
example scripts and benchmarks import it from here:

- ``ModularAdditionTransformer(p, d_model=128, n_heads=4, d_mlp=512, dropout=0.0)``: token
  embedding of ``p + 1`` tokens (``p`` is ``'='``), learned positional embedding for 3
  positions, one attention block with per-head-sliceable bias-free ``W_Q``/``W_K``/``W_V``/
  ``W_O``, a ReLU MLP block, residual connections, unembedding; ``forward(tokens [B, 3])``
  returns the logits ``[B, p]`` at the last position.
- ``make_dataset(p, train_fraction, seed)`` → ``(train_x, train_y, test_x, test_y)``: all
  pairs ``(a, b, '=') → (a + b) mod p``, split at random.
- ``head_slices(model)`` / ``component_groups(model)``: per-head parameter slices and the
  study's component groups for the kernel.
"""

from __future__ import annotations

from explaind_attr.app.demo.model import (
    ModularAdditionTransformer,
    component_groups,
    head_slices,
    make_dataset,
)

__all__ = ["ModularAdditionTransformer", "component_groups", "head_slices", "make_dataset"]
