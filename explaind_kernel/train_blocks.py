"""Blocks of rows on the training side: how many rows a vmapped block carries, and how auto's
calibration times a blocked route from its first blocks.

Each row of a block (a batch row for per-sample gradients, an adjoint row for output tangents)
carries tensors about the size of the replayed batch's activations, so a block holds about
rows × those bytes (counted as the outputs of the model's leaf modules: functional ops between
them are not seen, an estimate). Blocks are sized to BLOCK_BYTES: measured on the bench CNN
(batch 64, about 20 MB of activations in fp32) blocks of 4 rows ran the forward-mode
route 2.4× and the per-sample route 1.5–1.9× faster than blocks of 32–64 rows (elementwise ops
on large fresh tensors run far below memory speed), and auto's probe of a route costs two
small blocks instead of a whole batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from explaind_trace.reforward import tree_leaves

#: bytes of per-row tensors a vmapped block may carry (see the module docstring)
BLOCK_BYTES = 96 * 2**20


@contextlib.contextmanager
def counting_activations(module: nn.Module) -> Iterator[list[int]]:
    """Inside: the bytes of every tensor `module`'s leaf modules output are added up in the
    list's one entry (read-only forward hooks, removed on exit)."""
    total = [0]

    def count(_module, _args, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    handles = [m.register_forward_hook(count) for m in module.modules() if not any(m.children())]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def rows_per_block(activation_bytes: int, block_rows: int) -> int:
    """Rows per vmapped block: BLOCK_BYTES over the replay's activation bytes, in
    [1, block_rows]."""
    return max(1, min(block_rows, BLOCK_BYTES // max(1, activation_bytes)))


def mark_block(probe: dict[str, float] | None, done: int, blocks: int) -> bool:
    """The calibration's probe of a blocked route: after block `done` (from 1) of `blocks`,
    note the time in `probe` ("first_block", then "second_block") and say whether the probe
    has what it needs: the first block (replay and warm-up included) and, where there are
    more, a second one, the cost of each further block. A probe with a "limit" (seconds
    after its "t0": the best route's whole time so far) stops after its first block once past
    it: the route's time can only grow from there, so it cannot be the fastest."""
    if probe is None:
        return False
    probe["blocks"] = blocks
    now = time.perf_counter()
    probe["first_block" if done == 1 else "second_block"] = now
    if done == 1 and "limit" in probe and now - probe["t0"] > probe["limit"]:
        probe["stopped"] = 1.0
        return True
    return done >= min(2, blocks)


def probe_seconds(probe: Mapping[str, float], t0: float) -> float:
    """The whole route's time extrapolated from `mark_block`'s notes (started at `t0`); a
    probe stopped at its limit gives its first block's time, already more than the limit."""
    first = probe.get("first_block", time.perf_counter()) - t0
    if "second_block" not in probe:
        return first
    return first + (probe["second_block"] - t0 - first) * (probe["blocks"] - 1)


def row_scales(cots: list[Tensor], start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Powers of two (scale, unscale) [stop - start], float64, that bring each batch row's
    largest cotangent entry below 1 up into [0.5, 1) (rows at or above 0.5 keep 1).

    A backward is linear in its cotangent, and scaling by a power of two commutes exactly with
    every floating-point operation short of overflow and underflow: per-sample gradients of
    scaled one-hot cotangents, unscaled, are bitwise those of the plain ones — except where a
    row's cotangent is subnormal (a confident classifier's cross-entropy cotangent in fp32,
    p < 1.2e-38), whose backward would run on subnormals, several times slower on x86 and
    with fewer significant bits. There the scaled row is faster and more exact."""
    top = None
    for c in cots:
        m = c[start:stop].abs().reshape(stop - start, -1).amax(1).to(torch.float64)
        top = m if top is None else torch.maximum(top, m)
    assert top is not None
    limit = int(math.log2(torch.finfo(cots[0].dtype).max)) - 1  # 2^limit and 2^-limit: normal
    _, exp = torch.frexp(torch.where(top > 0, top, torch.ones_like(top)))
    up = (-exp).clamp(0, limit)
    one = torch.ones_like(top)
    return torch.ldexp(one, up), torch.ldexp(one, -up)


def tiny_row_groups(cots: list[Tensor]) -> list[tuple[list[Tensor], float]]:
    """The cotangents as (cotangents, unscale) groups whose backwards, unscaled and summed,
    give the backward of `cots`: rows whose largest entry is below √(smallest normal) (where a
    backward's products turn subnormal) go in a second group, scaled by one power of two so
    that their largest entry is in [0.5, 1). One group (unscaled) when no row is that small."""
    rows = cots[0].shape[0]
    top = torch.zeros(rows, dtype=torch.float64, device=cots[0].device)
    for c in cots:
        top = torch.maximum(top, c.abs().reshape(rows, -1).amax(1).to(torch.float64))
    tiny = (top > 0) & (top < math.sqrt(torch.finfo(cots[0].dtype).tiny))
    if not bool(tiny.any()):
        return [(cots, 1.0)]
    _, exp = torch.frexp(top[tiny].max())
    up = int(exp.neg().clamp(0, int(math.log2(torch.finfo(cots[0].dtype).max)) - 1))

    def rows_where(mask: Tensor, c: Tensor, s: float) -> Tensor:
        return torch.where(mask.reshape((-1,) + (1,) * (c.dim() - 1)), c * s, torch.zeros_like(c))

    return [
        ([rows_where(~tiny, c, 1.0) for c in cots], 1.0),
        ([rows_where(tiny, c, 2.0**up) for c in cots], 2.0**-up),
    ]


def limited_probe(t0: float, timings: Mapping[str, float]) -> dict[str, float]:
    """A fresh probe started at `t0`, limited to the fastest of the routes timed so far."""
    return {"t0": t0, "limit": min(timings.values())} if timings else {}


def competitive(seconds: float, timings: Mapping[str, float], margin: float = 1.25) -> bool:
    """Whether a route timed cold at `seconds` may still beat the fastest route so far once
    warm (it is timed again then): within `margin` times it, or nothing timed yet."""
    return not timings or seconds < margin * min(timings.values())
