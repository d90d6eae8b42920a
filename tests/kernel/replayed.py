"""A recorded training forward built by hand, for the training-side route tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from explaind_kernel.functional import FunctionalModel

CPU = torch.device("cpu")


def train_forward(model: nn.Module, shape: tuple[int, ...], batch: int, seed: int):
    """(FunctionalModel, float64 params, buffers, forward record) for `model` on a random
    batch of inputs of `shape` with random cotangents over 3 outputs, in train mode, with the
    RNG state the forward starts from (seeded by `seed`)."""
    torch.manual_seed(seed)
    fm = FunctionalModel(model, output_module=None, device=CPU, dtype=torch.float64)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    bufs = {k: (v.double() if v.is_floating_point() else v) for k, v in model.named_buffers()}
    x = torch.randn(batch, *shape, dtype=torch.float64)
    c = torch.randn(batch, 3, dtype=torch.float64)
    fwd = SimpleNamespace(
        ids=[str(i) for i in range(batch)],
        args=(x,),
        kwargs={},
        cotangent=c,
        training=True,
        rng_state=torch.get_rng_state(),
    )
    return fm, params, bufs, fwd
