"""DistributedDataParallel: which rank records what, where each rank's store lives, merging.

Under DDP every rank records its own forwards; rank 0 also records gradients, per-group
hyperparameters, checkpoints and the final state. One store per rank: the user passes one
path ``P`` (the same on every rank); rank 0 writes ``P`` and rank ``r > 0`` writes
``P.rank{r}`` (for a URL the suffix goes at the end of the URL, e.g. ``dir://runs/a.rank1``).
Every store's ``meta`` carries ``ddp = {rank, world_size, cotangent_scale}``.

DDP averages gradients over ranks, so each recorded cotangent is the local one divided by
the world size (``cotangent_scale = 1/world_size``): summed over the forwards of all ranks,
``Jᵀc`` then equals the (averaged) gradient rank 0 recorded.

Reading merges the ranks: ``open_rank_stores`` opens ``P.rank1 …`` next to rank 0's
store and ``check_ranks`` checks them against rank 0's header; the reader then takes
rank 0's record of a step and appends the other ranks' forwards (``ForwardRecord.rank``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

from .errors import DistributedTraceError, RecordingError, StoreError
from .records import TraceMeta
from .stores import Store, open_store

__all__ = [
    "DDPInfo",
    "unwrap_ddp",
    "rank_store_spec",
    "base_store_spec",
    "check_rank_steps",
    "check_rank",
    "check_ranks",
    "rank_specs",
    "open_rank_stores",
]

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


class RankTrace(Protocol):
    """What merging needs of one rank's reader."""

    name: str
    meta: TraceMeta
    num_steps: int

    def close(self) -> None: ...


R = TypeVar("R", bound=RankTrace)


def check_rank(rank0: RankTrace, r: int, rr: RankTrace) -> None:
    """Check the store of rank ``r`` against rank 0's header (schema, rank, parameters)."""
    mine, theirs = rank0.meta, rr.meta
    if theirs.schema_version != mine.schema_version:
        raise DistributedTraceError(
            f"{rank0.name}: rank {r}'s store {rr.name} has trace schema version "
            f"{theirs.schema_version} but rank 0's has {mine.schema_version}; the ranks "
            "of one run are written by the same explaind. Record again."
        )
    if (theirs.rank, theirs.world_size) != (r, mine.world_size):
        raise DistributedTraceError(
            f"{rank0.name}: the store {rr.name} expected for rank {r} of "
            f"{mine.world_size} says it is rank {theirs.rank} of {theirs.world_size}; "
            "it belongs to another run. Record again, or restore the right store."
        )
    if theirs.params != mine.params:
        raise DistributedTraceError(
            f"{rank0.name}: rank {r}'s store {rr.name} records different parameters "
            "(names, shapes or dtypes) than rank 0's; it belongs to another run."
        )


def check_ranks(rank0: RankTrace, ranks: Sequence[RankTrace]) -> int:
    """Check the stores of ranks 1.. against rank 0's; the number of steps all committed."""
    for r, rr in enumerate(ranks, start=1):
        check_rank(rank0, r, rr)
    return check_rank_steps(rank0.name, [rank0.num_steps, *(rr.num_steps for rr in ranks)])


def rank_specs(rank0: RankTrace, spec: Any) -> list[str]:
    """Where the stores of ranks 1.. of the DDP trace whose rank-0 reader is given live."""
    meta = rank0.meta
    if meta.rank != 0:
        raise DistributedTraceError(
            f"{rank0.name} holds only rank {meta.rank}'s forwards of a {meta.world_size}-rank "
            f"DDP trace; open rank 0's trace at {base_store_spec(spec)!r} instead."
        )
    if isinstance(spec, Store):
        raise DistributedTraceError(
            f"{rank0.name} is rank 0's store of a {meta.world_size}-rank DDP trace; open it by "
            "its path or URL so that the other ranks' stores ('<path>.rank{r}') can be found."
        )
    return [rank_store_spec(spec, r) for r in range(1, meta.world_size)]


def open_rank_stores(rank0: RankTrace, spec: Any, make: Callable[[Store, str], R]) -> list[R]:
    """Open the other ranks' stores of the DDP trace whose rank-0 reader is given.

    ``make(store, name)`` builds a reader over one store. On any failure the readers opened
    so far are closed.
    """
    meta = rank0.meta
    specs = rank_specs(rank0, spec)
    ranks: list[R] = []
    try:
        for r, where in enumerate(specs, start=1):
            try:
                store = open_store(where, readonly=True)
            except StoreError as e:
                raise DistributedTraceError(
                    f"{rank0.name}: the store of rank {r} of {meta.world_size} ({where!r}) "
                    f"cannot be opened ({e}). A DDP trace needs every rank's store next to rank "
                    "0's; copy them together."
                ) from e
            try:
                ranks.append(make(store, where))
            except StoreError as e:
                store.close()
                raise DistributedTraceError(
                    f"{rank0.name}: the store of rank {r} ({where!r}) is not readable: {e}"
                ) from e
            except BaseException:
                store.close()
                raise
    except BaseException:
        for rr in ranks:
            rr.close()
        raise
    return ranks
