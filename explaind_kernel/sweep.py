"""The backward sweep of one chunk of test inputs over a span of checkpoint segments.

Walking the steps backward (θ_t rebuilt by optimizer replay, segment by segment), each step τ
gets the integrated Jacobian J̄_τ of the chunk's explained rows (quadrature.integrate), the
optimizer rule turns it into the adjoint Z_τ, and the recorded training forwards of step τ are
replayed to contract per-sample gradients with Z_τ (training_side.py). Memory: one adjoint
per explained row plus one segment of θ_t, whatever the number of training samples or steps.

Three passes share this code (`mode`): "full" computes everything; the sharded path also runs
"propagate" (only carry a boundary adjoint through the span, J̄ = 0) and "correct" (only the
terms linear in that boundary adjoint: data, non-data, coupled decay, initial state).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .adjoints import FlatLayout, StepTerms, make_adjoints, slice_components
from .assemble import ChunkPiece, ChunkSums, SampleIndex, dense_scores
from .functional import to_numpy64
from .jacobian import TestSide
from .prefetch import SegmentPrefetcher, StepBundle, cotangent_resolver
from .problem import KernelProblem, RunPlan, State
from .quadrature import integrate
from .rules import ParamStep
from .rules.base import row_dot
from .training_side import TrainingSide
from .workmodel import PhaseClock, clock_of

SweepMode = Literal["full", "correct", "propagate"]
_MODES = ("full", "correct", "propagate")


class ChunkSweep:
    """Sweep test inputs [start, stop) of `plan` backward over some segments of the trace."""

    def __init__(
        self,
        problem: KernelProblem,
        plan: RunPlan,
        samples: SampleIndex,
        start: int,
        stop: int,
        *,
        mode: SweepMode = "full",
        carry_in: Mapping[str, Tensor] | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        cfg = problem.config
        self.problem, self.plan, self.samples, self.mode = problem, plan, samples, mode
        self.start, self.stop = start, stop
        self.test = problem.test_side(start, stop, plan.index)
        self.train = TrainingSide(problem.model, block_rows=cfg.block_rows, mode=cfg.training_mode)
        self.rows = (stop - start) * plan.width
        self.names = problem.param_names
        self.sums = ChunkSums.zeros(
            self.rows,
            problem.num_steps,
            len(problem.component_names),
            problem.num_windows,
            len(self.names),
            cfg.keep,
        )
        self.scores = (
            dense_scores(problem, self.rows) if cfg.keep.param_scores and mode == "full" else None
        )
        self.evaluations = np.zeros(problem.num_steps)
        self.clock = clock_of(problem.model)
        self.adjoints = make_adjoints(
            problem.rule,
            FlatLayout(problem.param_names, problem.param_shapes),
            self.rows,
            dtype=problem.dtype,
            device=problem.device,
            carry_in=carry_in,
        )

    def run(
        self,
        segments: list[tuple[int, int]] | None = None,
        bar: Any = None,
        *,
        prefetch: bool | None = None,
    ) -> ChunkPiece:
        """Sweep `segments` (default: the whole trace; a contiguous run) backward; `prefetch`
        overrides the config's (the sharded path reads without the background thread)."""
        problem = self.problem
        segments = list(problem.reader.segments()) if segments is None else segments
        end = segments[-1][1]
        after = self.plan.final if end == problem.num_steps else problem.checkpoint_state(end)
        f_end = self.test.values(after.params, after.buffers) if self.mode == "full" else None
        f_next = f_end
        bundles = SegmentPrefetcher(
            problem.reader,
            enabled=problem.config.prefetch if prefetch is None else prefetch,
            segments=segments,
            resolve=cotangent_resolver(problem),
            replay_args=problem.replay_args(),
        )
        clock = self.clock
        try:
            for bundle in _waited(bundles, clock):
                for sb in reversed(bundle):
                    f_next = self._step(sb, after, f_next)
                    after = State(
                        problem.to_compute_all(sb.step.params), problem.to_compute_all(sb.buffers)
                    )
                    if bar is not None:
                        bar.update(1)
        finally:
            bundles.close()
        return ChunkPiece(
            start=self.start,
            stop=self.stop,
            rows=self.rows,
            f0=to_numpy64(f_next) if f_next is not None else None,
            fT=to_numpy64(f_end) if f_end is not None else None,
            sums=self.sums,
            evaluations=self.evaluations,
            carry=self.adjoints.carried(),
            scores=self.scores,
        )

    # ------------------------------------------------------------------ steps
    def _step(self, sb: StepBundle, after: State, f_next: Tensor | None) -> Tensor | None:
        """One step backward (θ_{t+1}, b_{t+1} = `after`); returns f(θ_t, b_t)."""
        problem, sums, t = self.problem, self.sums, sb.step.index
        theta = problem.to_compute_all(sb.step.params)
        buf = problem.to_compute_all(sb.buffers)
        delta = {n: after.params[n] - theta[n] for n in self.names}
        if self.mode != "full":
            terms = self._rule_terms(sb, theta, delta, None)
            if terms is not None:
                self._record_sources(sb, theta, terms)
            return None
        clock = self.clock
        with clock.phase("values"):
            f_a = self.test.values(theta, buf)
            f_b = self.test.values(after.params, buf)
        path = to_numpy64(f_b) - to_numpy64(f_a)
        drift = to_numpy64(f_next) - to_numpy64(f_b)
        cfg = problem.config
        with clock.phase("test_jacobian"):
            got = integrate(
                self.test,
                theta,
                delta,
                buf,
                f_a,
                f_b,
                quadrature=problem.quadrature,
                subset=self._subset,
                kink_splits=cfg.kink_splits,
                kink_probes=cfg.kink_probes,
                adaptive_tol=cfg.adaptive_tol,
                max_nodes=cfg.max_nodes,
            )
        self.evaluations[t] = got.evaluations
        with clock.phase("rule"):
            # the per-tensor components come from the rule's pass over J̄ unless the adaptive
            # refinement measured them already
            terms = self._rule_terms(sb, theta, delta, got.jbar, got.components is None)
            values = got.components if got.components is not None else terms.components
            lin = got.lin if got.lin is not None else values.sum(1)
            if problem.slices:
                parts = slice_components(got.jbar, delta, problem.slices)
                values = np.concatenate([values, to_numpy64(torch.stack(parts, 1))], 1)
            if self.scores is not None:
                for n in self.names:
                    self.scores[n].addcmul_(got.jbar[n], delta[n])
        w = problem.window_of(t)
        sums.components += values
        if sums.component_window is not None:
            sums.component_window[:, :, w] += values
        del got

        self._record_sources(sb, theta, terms)
        sums.step_residual[:, t] = terms.residual
        sums.step_quadrature_error[:, t] = path - lin
        sums.step_buffer_drift[:, t] = drift
        return f_a

    def _subset(self, rows: Tensor) -> TestSide:
        """The test side of this chunk's inputs `rows`."""
        t = self.test
        return TestSide(
            t.fm, t.selector, tuple(x[rows] for x in t.inputs), t.index[rows], keys=t.keys
        )

    def _rule_terms(
        self, sb: StepBundle, theta, delta, jbar: Mapping[str, Tensor] | None, comps=False
    ) -> StepTerms | None:
        """Run the optimizer rule over every parameter tensor of step t at once (updating the
        carried adjoints). `jbar=None` means J̄ = 0: only what the carried adjoint contributes
        (the sharded scan and correction passes). None in the scan (no terms)."""
        problem, rs = self.problem, sb.step
        rec = rs.record
        steps = []
        for n in self.names:
            g = rec.grads.get(n)
            steps.append(
                ParamStep(
                    n,
                    None,
                    theta[n],
                    delta[n],
                    problem.to_compute(g) if g is not None else None,
                    rec.groups[rec.group_of[n]],
                    problem.to_compute_all(rs.state_before.get(n, {})),
                    problem.to_compute_all(rs.state_after.get(n, {})),
                )
            )
        return self.adjoints.step(
            problem.rule,
            steps,
            jbar,
            terms=self.mode != "propagate",
            initial=rs.index == 0,
            components=comps,
        )

    def _record_sources(self, sb: StepBundle, theta, terms: StepTerms) -> None:
        """Replay step t's training forwards and write its source-step terms."""
        t, sums = sb.step.index, self.sums
        with self.clock.phase("training"):
            data_t = self._training(sb, theta, terms.z_grad, terms.z_scale)
        sums.step_data[:, t] = data_t
        sums.step_weight_decay[:, t] = terms.weight_decay
        sums.step_nondata[:, t] = terms.total_g - data_t
        sums.step_initial_state[:, t] = terms.initial_state

    def _training(self, sb: StepBundle, theta, z_grad, scale: float) -> np.ndarray:
        """Replay each recorded forward of step t; accumulate K(x; i, t) (Z_τ = `scale` ·
        `z_grad`: the products are scaled once, in float64). Returns Σ_i K."""
        problem, sums, names = self.problem, self.sums, self.names
        w = problem.window_of(sb.step.index)
        data_t = np.zeros(self.rows)
        if not z_grad:
            return data_t
        prev_buf = sb.buffers_before
        for fwd in sb.step.record.forwards:
            if getattr(fwd, "buffers", None) is not None:
                prev_buf = fwd.buffers
            prods = self.train.products(
                theta,
                problem.to_compute_all(prev_buf),
                fwd,
                z_grad,
                per_param=sums.sample_component is not None,
            )
            k = _scaled(prods.k, scale)  # [B, R]
            self.clock.count("batch_rows", k.shape[0])
            self.clock.count("train_rows", k.shape[0] * k.shape[1])
            cols = [self.samples.column(sid) for sid in fwd.ids]
            sums.grow(len(self.samples))
            np.add.at(sums.data.T, cols, k)
            if sums.sample_window is not None:
                np.add.at(sums.sample_window[:, :, w].T, cols, k)
            if sums.sample_component is not None and prods.k_param is not None:
                for c, n in enumerate(names):
                    if n in prods.k_param:
                        np.add.at(
                            sums.sample_component[:, :, c].T, cols, _scaled(prods.k_param[n], scale)
                        )
            data_t += k.sum(0)
            # per tensor: the products' own sums where the route has them, else ⟨Z_n, Σ_i G_i⟩
            for c, n in enumerate(names):
                if prods.k_sum is not None and n in prods.k_sum:
                    sums.component_data[:, c] += _scaled(prods.k_sum[n], scale)
                elif n in prods.grad_sum:
                    v = row_dot(z_grad[n], prods.grad_sum[n])
                    sums.component_data[:, c] += _scaled(v, scale)
            for j, (pname, mask) in enumerate(problem.slices.values()):
                if pname in prods.grad_sum:
                    v = row_dot(z_grad[pname], mask * prods.grad_sum[pname])
                    sums.component_data[:, len(names) + j] += _scaled(v, scale)
        return data_t


def _scaled(t: Tensor, scale: float) -> np.ndarray:
    """`t` in float64 times `scale` (exactly `t` when the scale is 1)."""
    v = to_numpy64(t)
    return v if scale == 1.0 else v * scale


def _waited(bundles, clock: PhaseClock):
    """The prefetcher's bundles, the wait for each charged to "trace_wait"."""
    it = iter(bundles)
    while True:
        with clock.phase("trace_wait"):
            bundle = next(it, None)
        if bundle is None:
            return
        yield bundle
