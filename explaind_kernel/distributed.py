"""The path kernel sharded over processes with torch.distributed, exactly.

Ranks take contiguous runs of checkpoint segments. The only coupling between steps is the
adjoint the optimizer's momentum carries backward, and the sweep is linear in it. So:

1. every rank sweeps its own steps with a zero adjoint at its end boundary (all terms; the
   expensive Jacobians are computed once, in parallel);
2. a backward scan passes the exact boundary adjoints from the last rank to the first: rank r
   receives E_r, carries it through its steps with J̄ = 0 (optimizer replay and elementwise
   work only), adds its own phase-1 start adjoint and sends the sum to rank r−1;
3. every rank adds what E_r contributes on its steps (J̄ = 0 again, so only the training-side
   contraction is repeated), in parallel;
4. the partial results are summed across ranks (all_reduce, looping over the result's field
   lists; sample ids are exchanged as msgpack bytes in uint8 tensors — no pickle).

A rank may hold no segment (more ranks than segments): it passes the scan through and adds
zeros of the right shapes to every reduction. The computation runs under the same
`KernelProblem`, `ChunkSweep`, `assemble` and runtime settings (threads, TF32) as
`compute_kernel`.

The sharded result equals the single-process result to rounding (tests/kernel/test_sharded.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .assemble import ChunkPiece, ChunkSums, SampleIndex, assemble, dense_scores
from .config import KernelConfig, resolve_config
from .errors import InputError
from .problem import KernelProblem, RunPlan, open_reader
from .result import COMPONENT_FIELDS, SAMPLE_FIELDS, STEP_FIELDS, TERM_FIELDS, KernelResult
from .sweep import ChunkSweep

log = logging.getLogger(__name__)

#: the collective handles of the latest sharded chunk (see `_Shard.release`)
_LAST: list[tuple[Any, tuple[Any, ...]]] = []


def split_segments(segments: list[tuple[int, int]], world: int) -> list[list[tuple[int, int]]]:
    """Contiguous runs of segments, balanced by step count, one per rank (some may be empty)."""
    total = sum(b - a for a, b in segments)
    parts: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    done = 0
    for seg in segments:
        r = min(world - 1, (done * world) // max(total, 1))
        parts[r].append(seg)
        done += seg[1] - seg[0]
    return parts


def compute_kernel_sharded(
    trace: Any,
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    outputs: str | Callable[[Tensor], Tensor] = "all",
    labels: Any = None,
    output_names: list[str] | None = None,
    slices: Any = None,
    group: Any = None,
    config: KernelConfig | None = None,
    **options: Any,
) -> KernelResult:
    """`compute_kernel` on every rank of an initialised process group; every rank returns the
    full result (identical to the single-process one up to rounding)."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError(
            "compute_kernel_sharded needs an initialised torch.distributed process group; "
            "launch with `torchrun --nproc-per-node N -m explaind_kernel ...` or call "
            "torch.distributed.init_process_group first."
        )
    config = resolve_config(config, options, "compute_kernel_sharded")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    comm = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    with open_reader(trace) as reader:
        with KernelProblem.prepare(
            reader,
            model,
            inputs,
            config=config,
            outputs=outputs,
            labels=labels,
            output_names=output_names,
            slices=slices,
        ) as problem:
            parts = split_segments(list(reader.segments()), world)
            shard = _Shard(problem, parts, rank, world, group, comm)
            with problem.runtime(), torch.no_grad():
                plan = problem.plan()
                samples = SampleIndex()
                pieces = [shard.chunk(plan, samples, a, b) for a, b in plan.chunks]
            local = assemble(
                problem,
                plan,
                pieces,
                samples,
                extra={"world_size": world, "sharding": "exact adjoint scan"},
            )
            result = shard.reduce(local)
            shard.release()  # not on an error: the barrier would wait for the failed rank
            return result


class _Shard:
    """This rank's part of a sharded run: its segments, the scan, and the reduction."""

    def __init__(self, problem: KernelProblem, parts, rank: int, world: int, group, comm) -> None:
        self.problem, self.rank, self.world = problem, rank, world
        self.group, self.comm = group, comm
        self.mine: list[tuple[int, int]] = parts[rank]
        held = [r for r, p in enumerate(parts) if p]
        self.first, self.last = held[0], held[-1]  # the ranks holding step 0 and step T-1
        self.size = sum(int(np.prod(problem.param_shapes[n])) for n in problem.param_names)
        # every collective's work handle and tensors, released only by `release` (see there)
        self._held: list[tuple[Any, tuple[Any, ...]]] = []

    def _wait(self, work: Any, *tensors: Any) -> None:
        """Wait for a collective and keep its work handle and tensors referenced until
        `release`, so that the backend's worker thread never drops their last reference."""
        work.wait()
        self._held.append((work, tensors))

    def release(self) -> None:
        """After a barrier, drop the handles held since the previous release, on this thread.

        A gloo worker thread that drops the last reference to a work's tensors needs the GIL
        for their Python objects; if that happens while the interpreter is shutting down, the
        thread is killed inside C++ and the process aborts ("terminate called without an
        active exception"). Torch keeps the process group and its worker threads alive past
        `destroy_process_group` once `torch._dynamo` has been imported (torch.func does), so
        a rank that returned and exited quickly hit this intermittently. Held handles make the
        worker's own release a count decrement. The handles of the latest chunk stay held (in
        `_LAST`) until the next release or the interpreter's exit, on the main thread: by then
        their workers are long past them; the older ones are dropped here.
        """
        dist.barrier(self.group)
        _LAST[:] = self._held
        self._held = []

    def chunk(self, plan: RunPlan, samples: SampleIndex, start: int, stop: int) -> ChunkPiece:
        """Inputs [start, stop): phase 1 on this rank's steps, the backward scan of the exact
        boundary adjoints, the correction for the incoming one, the scores summed."""
        problem, rank, world, group, mine = (
            self.problem,
            self.rank,
            self.world,
            self.group,
            self.mine,
        )
        rows = (stop - start) * plan.width
        piece = (
            ChunkSweep(problem, plan, samples, start, stop).run(mine)
            if mine
            else self._empty(start, stop, rows)
        )
        incoming = torch.zeros(rows, self.size, dtype=problem.dtype, device=self.comm)
        if rank < world - 1:
            self._wait(dist.irecv(incoming, src=rank + 1, group=group), incoming)
        e_in = self._unflat(incoming.to(problem.device), rows)
        if rank > 0:
            if mine:
                start_carry = self._flat(piece.carry, rows)
                if rank < world - 1:
                    moved = ChunkSweep(
                        problem, plan, samples, start, stop, mode="propagate", carry_in=e_in
                    ).run(mine)
                    start_carry = start_carry + self._flat(moved.carry, rows)
            else:
                start_carry = incoming.to(problem.device)
            out = start_carry.to(self.comm).contiguous()
            self._wait(dist.isend(out, dst=rank - 1, group=group), out)
        if mine and rank < world - 1:
            corr = ChunkSweep(
                problem, plan, samples, start, stop, mode="correct", carry_in=e_in
            ).run(mine)
            piece.sums.add(corr.sums)
        if piece.scores is not None:  # Σ over ranks of Σ_t J̄⊙Δθ, then Σ_rows |·|
            for n, v in piece.scores.items():
                t = v.to(self.comm)
                self._wait(dist.all_reduce(t, group=group, async_op=True), t)
                piece.scores[n] = t
            piece.reduce_scores()
        self.release()  # the chunk's adjoint buffers are not kept past it
        return piece

    def _empty(self, start: int, stop: int, rows: int) -> ChunkPiece:
        """A rank with no steps still takes part in the scan and the reductions."""
        problem = self.problem
        sums = ChunkSums.zeros(
            rows,
            problem.num_steps,
            len(problem.component_names),
            problem.num_windows,
            len(problem.param_names),
            problem.config.keep,
        )
        scores = dense_scores(problem, rows) if problem.config.keep.param_scores else None
        return ChunkPiece(
            start, stop, rows, None, None, sums, np.zeros(problem.num_steps), {}, scores
        )

    def _flat(self, carry: dict[str, Tensor | None], rows: int) -> Tensor:
        problem = self.problem
        parts = []
        for n in problem.param_names:
            v = carry.get(n)
            parts.append(
                (v if v is not None else problem.zeros_like_rows(rows, n)).reshape(rows, -1)
            )
        return torch.cat(parts, dim=1)

    def _unflat(self, flat: Tensor, rows: int) -> dict[str, Tensor]:
        out, at = {}, 0
        for n in self.problem.param_names:
            shape = self.problem.param_shapes[n]
            size = int(np.prod(shape))
            out[n] = flat[:, at : at + size].reshape(rows, *shape).clone()
            at += size
        return out

    def _allreduce(self, arr: np.ndarray) -> np.ndarray:
        # a copy: on CPU the tensor would share `arr`'s memory and all_reduce writes in place
        t = torch.from_numpy(np.array(arr, dtype=np.float64, order="C", copy=True)).to(self.comm)
        self._wait(dist.all_reduce(t, group=self.group, async_op=True), t)
        return t.cpu().numpy()

    def _all_ids(self, ids: list[str]) -> list[list[str]]:
        comm, group, world = self.comm, self.group, self.world
        raw = msgpack.packb(ids, use_bin_type=True)
        n = torch.tensor([len(raw)], dtype=torch.int64, device=comm)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        self._wait(dist.all_gather(sizes, n, group=group, async_op=True), sizes, n)
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8, device=comm)
        buf[: len(raw)] = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(comm) if raw else buf[:0]
        )
        bufs = [torch.zeros(longest, dtype=torch.uint8, device=comm) for _ in range(world)]
        self._wait(dist.all_gather(bufs, buf, group=group, async_op=True), bufs, buf)
        return [
            msgpack.unpackb(b[: int(s.item())].cpu().numpy().tobytes(), raw=False)
            for b, s in zip(bufs, sizes)
        ]

    def reduce(self, local: KernelResult) -> KernelResult:
        """Sum the ranks' partial results into the full one (on every rank)."""
        # the global sample order is the single-process one: latest steps first
        order: dict[str, int] = {}
        for ids in reversed(self._all_ids(local.sample_ids)):
            for sid in ids:
                order.setdefault(sid, len(order))
        cols = [order[s] for s in local.sample_ids]
        res = local
        for name in SAMPLE_FIELDS:
            a = getattr(local, name)
            if a is not None:
                spread = np.zeros((*a.shape[:2], len(order), *a.shape[3:]))
                spread[:, :, cols] = a
                setattr(res, name, self._allreduce(spread))
        res.sample_ids = list(order)
        for name in (*STEP_FIELDS, *COMPONENT_FIELDS, "component_window"):
            if getattr(local, name) is not None:
                setattr(res, name, self._allreduce(getattr(local, name)))
        for name in TERM_FIELDS:
            setattr(res, name, getattr(res, f"step_{name}").sum(-1))
        zero = np.zeros_like(local.f0)
        res.f0 = self._allreduce(local.f0 if self.rank == self.first else zero)
        res.fT = self._allreduce(local.fT if self.rank == self.last else zero)
        if res.step_nodes is not None:
            res.step_nodes = self._allreduce(res.step_nodes)
        return res
