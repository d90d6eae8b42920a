"""DistributedDataParallel: which rank records what, where each rank's store lives, merging.

Under DDP every rank records its own forwards; rank 0 also records gradients, per-group
hyperparameters, checkpoints and the final state. One store per rank: the user passes one
path ``P`` (the same on every rank); rank 0 writes ``P`` and rank ``r > 0`` writes
``P.rank{r}`` (for a URL the suffix goes at the end of the URL, e.g. ``dir://runs/a.rank1``).
Every store's ``meta`` carries ``ddp = {rank, world_size, cotangent_scale}``.

DDP averages gradients over ranks, so each recorded cotangent is the local one divided by
the world size (``cotangent_scale = 1/world_size``): summed over the forwards of all ranks,
``Jᵀc`` then equals the (averaged) gradient rank 0 recorded.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from .errors import DistributedTraceError, RecordingError
from .stores import Store

__all__ = ["DDPInfo", "unwrap_ddp", "rank_store_spec", "base_store_spec", "check_rank_steps"]

logger = logging.getLogger(__name__)

_SUFFIX = re.compile(r"\.rank(\d+)$")


class DDPInfo:
    """Rank and world size of a DDP run (``world_size == 1``: not distributed)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size

    @property
    def cotangent_scale(self) -> float:
        return 1.0 / self.world_size

    def meta(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "cotangent_scale": self.cotangent_scale,
        }


def unwrap_ddp(model: torch.nn.Module) -> tuple[torch.nn.Module, DDPInfo | None]:
    """The module to record and the DDP rank info (``None`` when ``model`` is not DDP)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model, None
    import torch.distributed as dist

    group = getattr(model, "process_group", None)
    return model.module, DDPInfo(dist.get_rank(group), dist.get_world_size(group))


def rank_store_spec(spec: Any, rank: int) -> str:
    """Where rank ``rank`` writes given the user's ``store=`` (rank 0: unchanged)."""
    if isinstance(spec, Store) or spec is None:
        raise RecordingError(
            "recording a DistributedDataParallel model needs store= as a path or URL (the same "
            "on every rank), so that each rank can write its own store next to rank 0's "
            f"(rank r writes '<path>.rank{{r}}'); got {type(spec).__name__}."
        )
    base = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    return base if rank == 0 else f"{base}.rank{rank}"


def base_store_spec(spec: Any) -> str:
    """Rank 0's path given a rank store's path (strips ``.rank{r}``)."""
    return _SUFFIX.sub("", os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec))


def check_rank_steps(name: str, steps: list[int]) -> int:
    """The number of steps the merged trace can use: the common prefix of all ranks.

    Ranks of a run killed mid-step may be one step apart (then the common prefix is used
    with a warning); more than one step apart means the stores are not from the same run.
    """
    common = min(steps)
    for r, n in enumerate(steps[1:], start=1):
        if abs(n - steps[0]) > 1:
            raise DistributedTraceError(
                f"{name}: rank {r} recorded {n} steps but rank 0 recorded {steps[0]}; the ranks "
                "of one DDP run differ by at most one step (a run killed mid-step). These stores "
                "are not from the same run: record again, or remove the stale rank store."
            )
    if any(n != common for n in steps):
        logger.warning(
            "%s: the ranks recorded %s steps (a run interrupted mid-step); using the %d steps "
            "all ranks committed",
            name,
            steps,
            common,
        )
    return common
