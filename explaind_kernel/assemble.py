"""Accumulation and assembly: float64 sums per chunk of rows, then one `KernelResult`.

`ChunkSums` holds one array per accumulated result field, named as in `KernelResult`
(result.py's STEP_FIELDS, COMPONENT_FIELDS, "component_window" and SAMPLE_FIELDS), so adding
two chunks' sums, growing the sample axis and assembling the result all loop over those field
lists; no field is written out by hand. `SampleIndex` numbers the training samples in the
order the sweep meets them (latest steps first) and is shared by every chunk of a run.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from .config import KeepOptions
from .errors import InputError
from .functional import to_numpy64
from .problem import KernelProblem, RunPlan, optimizer_name, trace_fingerprint
from .result import SAMPLE_FIELDS, TERM_FIELDS, KernelResult

log = logging.getLogger(__name__)

_INITIAL_SAMPLES = 64


class SampleIndex:
    """Column of each training sample id on the sample axis, in order of first appearance."""

    def __init__(self) -> None:
        self._col: dict[int | str, int] = {}

    def column(self, sid: int | str) -> int:
        """The column of `sid` (a new one the first time it is seen). Ids keep their type
        (user ints stay ints); a trace mixing int and str ids is refused."""
        j = self._col.get(sid)
        if j is None:
            if self._col:
                first = next(iter(self._col))
                if type(sid) is not type(first):
                    raise InputError(
                        f"the trace mixes sample ids of types {type(first).__name__} and "
                        f"{type(sid).__name__} ({first!r} and {sid!r}): some forwards had ids "
                        "from set_sample_ids() and others the default content hashes; give "
                        "every recorded forward its ids (or none)"
                    )
            j = self._col[sid] = len(self._col)
        return j

    def __len__(self) -> int:
        return len(self._col)

    def ids(self) -> list[int | str]:
        """Sample ids in column order."""
        return list(self._col)


@dataclass
class ChunkSums:
    """float64 sums of one chunk of R rows over T steps, C components, W windows, S samples.

    Field names are KernelResult's; None for a joint slice that is not kept.
    """

    step_data: np.ndarray  # [R, T]
    step_weight_decay: np.ndarray
    step_nondata: np.ndarray
    step_initial_state: np.ndarray
    step_residual: np.ndarray
    step_quadrature_error: np.ndarray
    step_buffer_drift: np.ndarray
    components: np.ndarray  # [R, C]
    component_data: np.ndarray  # [R, C]
    component_window: np.ndarray | None  # [R, C, W]
    data: np.ndarray  # [R, S]
    sample_component: np.ndarray | None  # [R, S, P] (parameter tensors only)
    sample_window: np.ndarray | None  # [R, S, W]

    @classmethod
    def zeros(
        cls, rows: int, steps: int, comps: int, windows: int, params: int, keep: KeepOptions
    ) -> ChunkSums:
        """All sums zero, with room for 64 samples (grown on demand)."""
        z, s = np.zeros, _INITIAL_SAMPLES
        return cls(
            **{f: z((rows, steps)) for f in _STEP_NAMES},
            components=z((rows, comps)),
            component_data=z((rows, comps)),
            component_window=z((rows, comps, windows)) if keep.component_window else None,
            data=z((rows, s)),
            sample_component=z((rows, s, params)) if keep.sample_component else None,
            sample_window=z((rows, s, windows)) if keep.sample_window else None,
        )

    @property
    def capacity(self) -> int:
        """Samples the sample axis has room for."""
        return int(self.data.shape[1])

    def grow(self, n: int) -> None:
        """Make room for `n` samples (doubling, so growth is amortised)."""
        cap = self.capacity
        if n <= cap:
            return
        new = max(n, 2 * cap)
        for name in SAMPLE_FIELDS:
            a = getattr(self, name)
            if a is not None:
                setattr(self, name, _pad(a, 1, new))

    def add(self, other: ChunkSums) -> None:
        """Add `other` (the same rows; its samples a prefix of this chunk's or more)."""
        self.grow(other.capacity)
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is None or theirs is None:
                continue
            if f.name in SAMPLE_FIELDS:
                mine[:, : theirs.shape[1]] += theirs
            else:
                mine += theirs


_STEP_NAMES = tuple(f.name for f in dataclasses.fields(ChunkSums) if f.name.startswith("step_"))


def _pad(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    shape = list(a.shape)
    shape[axis] = size
    out = np.zeros(shape)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


@dataclass
class ChunkPiece:
    """What sweeping one chunk of test inputs [start, stop) produced.

    f0, fT:      [R] f(x; θ_start) and f(x; θ_end) of the swept span (None for spans that
                 computed no values: the sharded scan and correction passes).
    sums:        the chunk's accumulated terms.
    evaluations: [T] Jacobian evaluations per step, summed over the chunk's test inputs.
    carry:       the adjoints carried out of the span's first step ({} when none).
    scores:      {name: [R, *shape]} Σ_t J̄_t ⊙ Δθ_t over the span (keep.param_scores).
    """

    start: int
    stop: int
    rows: int
    f0: np.ndarray | None
    fT: np.ndarray | None
    sums: ChunkSums
    evaluations: np.ndarray
    carry: dict[str, Tensor | None]
    scores: dict[str, Tensor] | None = None
    score_sums: dict[str, np.ndarray] | None = None

    def reduce_scores(self) -> None:
        """Turn the dense scores into Σ_rows |·| (what the result keeps), freeing them."""
        if self.scores is not None:
            self.score_sums = {n: to_numpy64(v.abs().sum(0)) for n, v in self.scores.items()}
            self.scores = None


def assemble(
    problem: KernelProblem,
    plan: RunPlan,
    pieces: list[ChunkPiece],
    samples: SampleIndex,
    *,
    extra: dict | None = None,
) -> KernelResult:
    """One KernelResult from the chunks' pieces (in input order)."""
    n, s, width = problem.num_inputs, len(samples), plan.width

    def cat(arrs: list[np.ndarray]) -> np.ndarray:
        full = np.concatenate(arrs, axis=0)
        return full.reshape(n, width, *full.shape[1:])

    arrays: dict[str, np.ndarray | None] = {}
    for f in dataclasses.fields(ChunkSums):
        parts = [getattr(p.sums, f.name) for p in pieces]
        if any(a is None for a in parts):
            arrays[f.name] = None
            continue
        arrays[f.name] = cat([a[:, :s] for a in parts] if f.name in SAMPLE_FIELDS else parts)
    for name in TERM_FIELDS:
        arrays[name] = arrays[f"step_{name}"].sum(-1)
    keep = problem.config.keep
    scores = None
    if keep.param_scores:
        for p in pieces:
            p.reduce_scores()
        scores = {k: sum(p.score_sums[k] for p in pieces) for k in problem.param_names}
    f0 = [p.f0 if p.f0 is not None else np.zeros(p.rows) for p in pieces]
    fT = [p.fT if p.fT is not None else np.zeros(p.rows) for p in pieces]
    res = KernelResult(
        trace_id=trace_fingerprint(problem.reader),
        config=problem.config.to_dict(),
        output_names=problem.selector.output_names(width),
        sample_ids=samples.ids(),
        component_names=problem.component_names,
        component_kinds=problem.component_kinds,
        window_edges=list(problem.window_edges),
        num_steps=problem.num_steps,
        f0=np.concatenate(f0).reshape(n, width),
        fT=np.concatenate(fT).reshape(n, width),
        param_scores=scores,
        step_nodes=sum(p.evaluations for p in pieces) / n if pieces else None,
        extra={
            "finished": bool(problem.reader.finished),
            "optimizer": optimizer_name(problem.reader),
            "device": str(problem.device),
            **problem.selector.describe(plan.predicted),
            "inputs_digest": problem.inputs_digest,
            "cpu_threads": problem.cpu_threads(),
            "training_routes": dict(getattr(problem.model, "training_routes", None) or {}),
            **(extra or {}),
        },
        **arrays,
    )
    log.info("path kernel done: %s", res.completeness_line())
    return res


def dense_scores(problem: KernelProblem, rows: int) -> dict[str, Tensor]:
    """Zero score accumulators [rows, *shape] per parameter tensor."""
    return {n: problem.zeros_like_rows(rows, n) for n in problem.param_names}


__all__ = ["ChunkPiece", "ChunkSums", "SampleIndex", "assemble", "dense_scores"]
