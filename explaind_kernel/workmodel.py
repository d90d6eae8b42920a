"""The work model: the floating-point work a kernel run must do per phase, from shapes alone,
next to the time each phase took (both land in `KernelResult.extra["work"]`).

Phases (FLOPs; F = forward FLOPs of one test input, counted by torch's FlopCounterMode on the
final model — matmuls, convolutions, attention —; P parameters, R = n·O explained rows):

* test_jacobian: E · O · 2F — one backward of one test input per explained output and
  Jacobian evaluation, E evaluations summed over inputs and steps (kink pieces included);
* values:        the two forwards per step that measure Δf: 2 · T · n · F;
* kinks:         (kink_probes + 1) probe forwards per step: T · (probes + 1) · n · F;
* training:      per recorded forward of B samples, the products B · P · R · 2 and the replay
                 (a forward and a backward of the batch, B · 3F, the test input's F standing
                 in for a training sample's);
* rule:          the adjoint recursion, about 8 · R · P per step (elementwise).

The clock keeps exclusive times (a phase inside another — kinks inside test_jacobian — is
charged to the inner one); "trace_wait" is the time the sweep waited for the trace reader and
optimizer replay (a background thread), "other" the rest of the run. On CUDA the times are
host-side (no synchronisation is added to measure them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

PHASES = ("test_jacobian", "values", "kinks", "training", "rule", "trace_wait")


class PhaseClock:
    """Exclusive wall time per phase, and counters of work done (one per run)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.counts: dict[str, float] = {}
        self._stack: list[list] = []  # [phase, start of its current exclusive slice]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the block's time to `name` (minus the phases nested in it)."""
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            top = self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + end - top[1]
            if self._stack:
                self._stack[-1][1] = end

    def count(self, key: str, amount: float) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + float(amount)


def clock_of(fm: Any) -> PhaseClock:
    """The run's clock, kept on its functional model copy (shared by every chunk)."""
    clock = getattr(fm, "phase_clock", None)
    if clock is None:
        clock = fm.phase_clock = PhaseClock()
    return clock


def forward_flops(call) -> float:
    """FLOPs of `call()` (one forward) as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call()
    return float(counter.get_total_flops())


def work_model(
    *,
    flops_per_input: float,
    num_inputs: int,
    width: int,
    num_params: int,
    num_steps: int,
    evaluations: float,
    kink_probes: int | None,
    clock: PhaseClock,
    wall: float,
) -> dict[str, Any]:
    """{"flops": {phase: FLOPs}, "seconds": {phase: s}, "wall": s} for a finished run.
    `evaluations` is the number of Jacobian evaluations, summed over test inputs and steps."""
    f, n, rows, p = flops_per_input, num_inputs, num_inputs * width, num_params
    train_rows = clock.counts.get("train_rows", 0.0)  # Σ over forwards of B · R
    batch_rows = clock.counts.get("batch_rows", 0.0)  # Σ over forwards of B
    flops = {
        "test_jacobian": evaluations * width * 2.0 * f,
        "values": 2.0 * num_steps * n * f,
        "kinks": float(num_steps * (kink_probes + 1) * n * f) if kink_probes else 0.0,
        "training": 2.0 * train_rows * p + 3.0 * batch_rows * f,
        "rule": 8.0 * num_steps * rows * p,
    }
    seconds = {k: round(v, 6) for k, v in clock.seconds.items()}
    seconds["other"] = round(max(0.0, wall - sum(clock.seconds.values())), 6)
    return {"flops": flops, "seconds": seconds, "wall": round(wall, 6), "counts": clock.counts}


__all__ = ["PHASES", "PhaseClock", "clock_of", "forward_flops", "work_model"]
