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
4. the partial results are summed across ranks (all_reduce; sample ids are exchanged as msgpack
   bytes in uint8 tensors — no pickle).

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

from .config import KernelConfig
from .engine import _STEP_KEYS, _np, _open, _Sweep
from .errors import InputError
from .result import KernelResult

log = logging.getLogger(__name__)


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
    if config is None:
        config = KernelConfig(**options)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    reader, owned = _open(trace)
    try:
        sweep = _Sweep(reader, model, inputs, outputs, labels, output_names, slices, config)
        mine = split_segments(list(reader.segments()), world)[rank]
        comm = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        pieces, width = _sharded_pieces(sweep, mine, rank, world, group, comm)
        local = sweep._assemble(pieces, width)
        return _reduce(local, pieces, sweep, rank, world, group, comm)
    finally:
        if owned:
            reader.close()


def _flat(carry: dict[str, Tensor | None], sweep: _Sweep, rows: int) -> Tensor:
    parts = []
    for n in sweep.names:
        v = carry.get(n)
        shape = sweep.theta_T[n].shape
        parts.append(
            (
                v
                if v is not None
                else torch.zeros(rows, *shape, dtype=sweep.dtype, device=sweep.device)
            ).reshape(rows, -1)
        )
    return torch.cat(parts, dim=1)


def _unflat(flat: Tensor, sweep: _Sweep, rows: int) -> dict[str, Tensor]:
    out, at = {}, 0
    for n in sweep.names:
        shape = sweep.theta_T[n].shape
        size = int(np.prod(shape))
        out[n] = flat[:, at : at + size].reshape(rows, *shape).clone()
        at += size
    return out


def _sharded_pieces(sweep: _Sweep, mine, rank: int, world: int, group, comm):
    from .engine import _threads  # the same thread policy as compute_kernel

    cfg = sweep.config
    with _threads(cfg.cpu_threads if sweep.device.type == "cpu" else None), torch.no_grad():
        final = sweep.reader.final()
        if final is not None:
            theta_T, buf_T = final.params, final.buffers
        else:
            theta_T, buf_T = sweep.reader.params_at(sweep.T), sweep.reader.buffers_at(sweep.T - 1)
        sweep.theta_T, sweep.buf_T = sweep._cd(theta_T), sweep._cd(buf_T)
        index = sweep._index()
        sweep.fm.set_modes(False)
        width = sweep._width(index)
        chunk = sweep._chunk_size(width)
        sweep.sample_index = {}
        pieces = []
        for start in range(0, sweep.N, chunk):
            stop = min(sweep.N, start + chunk)
            xs = tuple(x[start:stop] for x in sweep.inputs)
            idx = index[start:stop]
            rows = (stop - start) * width
            piece = (
                sweep._sweep(xs, idx, width, None, segments=mine, mode="full")
                if mine
                else _empty(sweep, xs, idx, width)
            )
            # backward scan of the exact boundary adjoints
            size = rows * sum(int(np.prod(sweep.theta_T[n].shape)) for n in sweep.names)
            incoming = torch.zeros(rows, size // max(rows, 1), dtype=sweep.dtype, device=comm)
            if rank < world - 1:
                dist.recv(incoming, src=rank + 1, group=group)
            e_in = _unflat(incoming.to(sweep.device), sweep, rows)
            if rank > 0:
                start_carry = _flat(piece["carry"], sweep, rows)
                if mine and rank < world - 1:
                    moved = sweep._sweep(
                        xs, idx, width, None, segments=mine, carry_in=e_in, mode="propagate"
                    )["carry"]
                    start_carry = start_carry + _flat(moved, sweep, rows)
                elif not mine:
                    start_carry = incoming.to(sweep.device)
                dist.send(start_carry.to(comm).contiguous(), dst=rank - 1, group=group)
            if mine and rank < world - 1:
                corr = sweep._sweep(
                    xs, idx, width, None, segments=mine, carry_in=e_in, mode="correct"
                )
                _add_into(piece["acc"], corr["acc"])
            if "scores_raw" in piece:
                piece["scores_dense"] = piece.pop("scores_raw")
            pieces.append(piece)
        sweep.fm.close()
    return pieces, width


def _empty(sweep: _Sweep, xs, idx, width: int) -> dict[str, Any]:
    """A rank with no steps still takes part in the scan and the reduction."""
    from .engine import _Acc

    rows = int(xs[0].shape[0]) * width
    comps = len(sweep.names) + len(sweep.slices)
    acc = _Acc(rows, sweep.T, comps, len(sweep.edges) - 1, sweep.config.keep, len(sweep.names))
    return {
        "f0": None,
        "fT": None,
        "acc": acc,
        "nodes": np.zeros(sweep.T, dtype=np.int64),
        "carry": {},
    }


def _add_into(acc, corr) -> None:
    for k in ("data", "weight_decay", "nondata", "initial_state"):
        acc.step[k] += corr.step[k]
    acc.component_data += corr.component_data
    acc.grow(corr.data.shape[1])
    acc.data[:, : corr.data.shape[1]] += corr.data
    for name in ("sample_component", "sample_window"):
        mine, theirs = getattr(acc, name), getattr(corr, name)
        if mine is not None:
            mine[:, : theirs.shape[1]] += theirs


def _allreduce(arr: np.ndarray, group, comm) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(comm)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.cpu().numpy()


def _all_ids(ids: list[str], world: int, group, comm) -> list[list[str]]:
    raw = msgpack.packb(ids, use_bin_type=True)
    n = torch.tensor([len(raw)], dtype=torch.int64, device=comm)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=comm)
    buf[: len(raw)] = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(comm) if raw else buf[:0]
    )
    bufs = [torch.zeros(longest, dtype=torch.uint8, device=comm) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [
        msgpack.unpackb(b[: int(s.item())].cpu().numpy().tobytes(), raw=False)
        for b, s in zip(bufs, sizes)
    ]


def _reduce(
    local: KernelResult, pieces, sweep: _Sweep, rank: int, world: int, group, comm
) -> KernelResult:
    # the global sample order is the single-process one: latest steps first
    per_rank = _all_ids(local.sample_ids, world, group, comm)
    order: dict[str, int] = {}
    for ids in reversed(per_rank):
        for sid in ids:
            order.setdefault(sid, len(order))
    cols = [order[s] for s in local.sample_ids]

    def spread(a: np.ndarray | None, axis: int) -> np.ndarray | None:
        if a is None:
            return None
        shape = list(a.shape)
        shape[axis] = len(order)
        out = np.zeros(shape)
        index = [slice(None)] * a.ndim
        index[axis] = cols
        out[tuple(index)] = a
        return _allreduce(out, group, comm)

    res = local
    res.sample_ids = list(order)
    res.data = spread(local.data, 2)
    res.sample_component = spread(local.sample_component, 2)
    res.sample_window = spread(local.sample_window, 2)
    for name in ["step_" + k for k in _STEP_KEYS] + ["components", "component_data"]:
        setattr(res, name, _allreduce(getattr(local, name), group, comm))
    if local.component_window is not None:
        res.component_window = _allreduce(local.component_window, group, comm)
    for k in _STEP_KEYS[1:]:
        setattr(res, k, getattr(res, f"step_{k}").sum(-1))
    owns_start = rank == 0
    owns_end = rank == world - 1
    res.f0 = _allreduce(local.f0 if owns_start else np.zeros_like(local.f0), group, comm)
    res.fT = _allreduce(local.fT if owns_end else np.zeros_like(local.fT), group, comm)
    if res.step_nodes is not None:
        res.step_nodes = _allreduce(res.step_nodes.astype(np.float64), group, comm)
    if sweep.config.keep.param_scores:
        res.param_scores = {}
        for n in sweep.names:
            dense = [p["scores_dense"][n] if "scores_dense" in p else None for p in pieces]
            total = 0.0
            for d in dense:
                if d is None:
                    d = torch.zeros(1, *sweep.theta_T[n].shape, dtype=sweep.dtype)
                t = d.to(comm).double()
                shape = torch.tensor(list(t.shape), device=comm)
                del shape
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
                total = total + _np(t.abs().sum(0))
            res.param_scores[n] = total
    res.extra = {**res.extra, "world_size": world, "sharding": "exact adjoint scan"}
    return res
