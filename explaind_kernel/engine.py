"""`compute_kernel`: a recorded run rewritten exactly as a kernel machine (docs/design.md §1–3).

The work is split by job, and this module only strings the jobs together:

- problem.py:    `KernelProblem` — the inputs, labels, outputs, slices and windows, validated
                 against the trace; `plan()` fixes the explained outputs and the input chunks;
- sweep.py:      `ChunkSweep` — the backward sweep of one chunk over the trace's segments;
- quadrature.py: `integrate` — J̄ of one step by the rule, kink pieces, adaptive bisection;
- assemble.py:   the per-chunk float64 sums and the one `KernelResult` they make;
- runtime.py:    the thread and TF32 settings the computation runs under.

The sharded path (distributed.py) and `compare_quadrature` (compare.py) use the same pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .assemble import ChunkPiece, SampleIndex, assemble
from .config import KernelConfig, resolve_config
from .problem import KernelProblem, SliceSpec, open_reader, trace_fingerprint
from .result import KernelResult
from .sweep import ChunkSweep
from .workmodel import clock_of, forward_flops, work_model


def compute_kernel(
    trace: Any,
    model: nn.Module,
    inputs: Any,
    *,
    outputs: str | Callable[..., Tensor] = "all",
    labels: Tensor | np.ndarray | Sequence[Any] | None = None,
    output_names: list[str] | None = None,
    slices: SliceSpec | None = None,
    config: KernelConfig | None = None,
    **options: Any,
) -> KernelResult:
    """Rewrite the traced model's outputs on `inputs` as an exact kernel machine.

    trace:   a path/URL of a trace or an open `explaind_trace.TraceReader`.
    model:   a model of the traced architecture (never modified; a private copy is used).
    inputs:  test inputs [N, ...]: a tensor or numpy array, a tuple of tensors (positional) or
             a dict (keyword inputs), an (x, y) tuple, or a Dataset / DataLoader yielding
             x or (x, y) (see explaind_kernel.inputs).
    outputs: the target (explaind_kernel.targets): "all", "predicted" (argmax of the final
             model), "label", "loss" (cross-entropy, or NLL for log-probability outputs),
             "margin", a registered name, or fn(output, labels) -> [n] or [n, O], called
             with each chunk's labels aligned to its rows.
    labels:  one label per test input (class indices for "label", "loss", "margin"); wins
             over labels that come with the inputs.
    slices:  {name: (parameter name, index or boolean mask)} user-defined parameter slices.
    config / options: a KernelConfig, or its fields as keyword arguments (not both).
    """
    config = resolve_config(config, options, "compute_kernel")
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
            started = time.perf_counter()
            with problem.runtime(), torch.no_grad():
                plan = problem.plan()
                samples = SampleIndex()
                pieces: list[ChunkPiece] = []
                with tqdm(
                    total=problem.num_steps * len(plan.chunks),
                    desc="path kernel",
                    unit="step",
                    disable=not config.progress,
                ) as bar:
                    for start, stop in plan.chunks:
                        piece = ChunkSweep(problem, plan, samples, start, stop).run(bar=bar)
                        piece.reduce_scores()  # Σ_rows |·| now: dense scores are chunk-sized
                        pieces.append(piece)
                work = run_work(problem, plan, pieces, time.perf_counter() - started)
            return assemble(problem, plan, pieces, samples, extra={"work": work})


def run_work(problem: KernelProblem, plan, pieces: list[ChunkPiece], wall: float) -> dict:
    """The run's work model (workmodel.py): FLOPs per phase from shapes, seconds measured."""
    first = problem.test_side(0, 1, plan.index)
    flops = forward_flops(lambda: first.values(plan.final.params, plan.final.buffers))
    cfg = problem.config
    return work_model(
        flops_per_input=flops,
        num_inputs=problem.num_inputs,
        width=plan.width,
        num_params=sum(int(np.prod(s)) for s in problem.param_shapes.values()),
        num_steps=problem.num_steps,
        evaluations=float(sum(p.evaluations.sum() for p in pieces)),
        kink_probes=cfg.kink_probes if cfg.kink_splits > 0 else None,
        clock=clock_of(problem.model),
        wall=wall,
    )


__all__ = ["compute_kernel", "trace_fingerprint"]
