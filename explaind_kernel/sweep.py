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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

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


@dataclass
class SourceTerms:
    """Per-row terms of one step that the optimizer rule yields ([R] float64 each)."""

    weight_decay: np.ndarray
    total_g: np.ndarray  # ⟨Z_τ, g_τ⟩: all that reached the gradient (data + non-data)
    initial_state: np.ndarray
    residual: np.ndarray

    @classmethod
    def zeros(cls, rows: int) -> SourceTerms:
        return cls(*(np.zeros(rows) for _ in range(4)))


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
        self.carry: dict[str, Tensor | None] = {n: None for n in self.names}
        self.carry.update(dict(carry_in or {}))

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
            carry=self.carry,
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
            z_grad, terms = self._rule_terms(sb, theta, delta, None)
            if self.mode == "correct":
                self._record_sources(sb, theta, z_grad, terms)
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
        jbar, lin = got.jbar, got.lin
        self.evaluations[t] = got.evaluations
        comp = {n: row_dot(jbar[n], delta[n]) for n in self.names}
        with clock.phase("rule"):
            z_grad, terms = self._rule_terms(sb, theta, delta, jbar)

        w = problem.window_of(t)
        values = [to_numpy64(comp[n]) for n in self.names]
        values += [
            to_numpy64(row_dot(jbar[pname] * mask, delta[pname]))
            for pname, mask in problem.slices.values()
        ]
        for c, v in enumerate(values):
            sums.components[:, c] += v
            if sums.component_window is not None:
                sums.component_window[:, c, w] += v
        if self.scores is not None:
            for n in self.names:
                self.scores[n] += jbar[n] * delta[n]
        del jbar, got

        self._record_sources(sb, theta, z_grad, terms)
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

    def _rule_terms(self, sb: StepBundle, theta, delta, jbar) -> tuple[dict, SourceTerms]:
        """Run the optimizer rule over the parameter tensors of step t (updating the carried
        adjoints). `jbar=None` means J̄ = 0: only what the carried adjoint contributes (the
        sharded scan and correction passes). Returns (z_grad, per-row source terms)."""
        problem, rs, carry = self.problem, sb.step, self.carry
        t, rule, rec = rs.index, problem.rule, rs.record
        z_grad: dict[str, Tensor] = {}
        terms = SourceTerms.zeros(self.rows)
        for n in self.names:
            if jbar is None and carry[n] is None:
                continue
            jb = jbar[n] if jbar is not None else problem.zeros_like_rows(self.rows, n)
            g = rec.grads.get(n)
            g = problem.to_compute(g) if g is not None else None
            before = problem.to_compute_all(rs.state_before.get(n, {}))
            after = problem.to_compute_all(rs.state_after.get(n, {}))
            hp = rec.groups[rec.group_of[n]]
            out = rule.backward(
                ParamStep(n, jb, theta[n], delta[n], g, hp, before, after), carry[n]
            )
            carry[n] = out.carry
            if self.mode == "propagate":
                continue
            terms.weight_decay += to_numpy64(out.weight_decay)
            if jbar is not None:
                terms.residual += to_numpy64(row_dot(jb, delta[n] - out.recon))
            if out.z_grad is not None and g is not None:
                z_grad[n] = out.z_grad
                terms.total_g += to_numpy64(row_dot(out.z_grad, g))
            if t == 0:
                terms.initial_state += to_numpy64(
                    rule.initial_state_term(carry[n], before, self.rows, jb)
                )
        return z_grad, terms

    def _record_sources(self, sb: StepBundle, theta, z_grad, terms: SourceTerms) -> None:
        """Replay step t's training forwards and write its source-step terms."""
        t, sums = sb.step.index, self.sums
        with self.clock.phase("training"):
            data_t = self._training(sb, theta, z_grad)
        sums.step_data[:, t] = data_t
        sums.step_weight_decay[:, t] = terms.weight_decay
        sums.step_nondata[:, t] = terms.total_g - data_t
        sums.step_initial_state[:, t] = terms.initial_state

    def _training(self, sb: StepBundle, theta, z_grad) -> np.ndarray:
        """Replay each recorded forward of step t; accumulate K(x; i, t). Returns Σ_i K."""
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
            k = to_numpy64(prods.k)  # [B, R]
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
                            sums.sample_component[:, :, c].T, cols, to_numpy64(prods.k_param[n])
                        )
            data_t += k.sum(0)
            for c, n in enumerate(names):
                if n in prods.grad_sum:
                    sums.component_data[:, c] += to_numpy64(row_dot(z_grad[n], prods.grad_sum[n]))
            for j, (pname, mask) in enumerate(problem.slices.values()):
                if pname in prods.grad_sum:
                    v = row_dot(z_grad[pname] * mask, prods.grad_sum[pname])
                    sums.component_data[:, len(names) + j] += to_numpy64(v)
        return data_t


def _waited(bundles, clock: PhaseClock):
    """The prefetcher's bundles, the wait for each charged to "trace_wait"."""
    it = iter(bundles)
    while True:
        with clock.phase("trace_wait"):
            bundle = next(it, None)
        if bundle is None:
            return
        yield bundle
