"""Choose a quadrature rule before paying for the kernel: each rule's error over a whole trace.

The kernel's reconstruction f(x; θ_0) + Σ_t J̄_t·Δθ_t differs from f(x; θ_T) by its quadrature
error Σ_t (Δf_t − J̄_t·Δθ_t) (reported as a term, so the decomposition stays complete). That
error depends only on J̄_t·Δθ_t, and by linearity J̄_t·Δθ_t = Σ_k w_k d/ds f(θ_t + s_kΔθ_t): a
forward-mode JVP per node, for all explained outputs at once, at the very nodes the kernel
would use (kink splits included). So a rule's error over the whole run costs a few forward
passes per step, where the kernel costs a backward per explained output and a training-side
replay.

>>> for r in compare_quadrature("runs/a.lmdb", model, test_x, ["gauss:2", "gauss:1+kinks"]):
...     print(r.rule, r.evaluations_per_step, r.rel_error)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import KernelConfig, resolve_config
from .errors import InputError
from .functional import to_numpy64
from .prefetch import SegmentPrefetcher
from .problem import KernelProblem, open_reader
from .quadrature import Quadrature

log = logging.getLogger(__name__)

DEFAULT_KINK_LIMIT = 64


@dataclass(frozen=True)
class RuleSpec:
    """A quadrature rule with optional kink splits: "gauss:2", "gauss:1+kinks", "gauss:2+kinks:8"."""

    quadrature: Quadrature
    kink_splits: int = 0

    @classmethod
    def parse(cls, spec: str | RuleSpec) -> RuleSpec:
        """Parse RULE:NODES[+kinks[:LIMIT]]; +kinks alone allows up to 64 cuts per step."""
        if isinstance(spec, RuleSpec):
            return spec
        base, plus, extra = str(spec).partition("+")
        if not plus:
            return cls(Quadrature.parse(base))
        name, _, limit = extra.partition(":")
        if name != "kinks":
            raise InputError(
                f"cannot parse rule {spec!r}: expected RULE:NODES or RULE:NODES+kinks[:LIMIT], "
                "e.g. 'gauss:2' or 'gauss:1+kinks:16'"
            )
        try:
            splits = int(limit) if limit else DEFAULT_KINK_LIMIT
        except ValueError as e:
            raise InputError(f"cannot parse the kink limit in {spec!r}: {limit!r}") from e
        if splits < 1:
            raise InputError(f"the kink limit in {spec!r} must be ≥ 1")
        return cls(Quadrature.parse(base), splits)

    def __str__(self) -> str:
        if not self.kink_splits:
            return str(self.quadrature)
        return f"{self.quadrature}+kinks:{self.kink_splits}"


@dataclass
class QuadratureErrors:
    """One rule's quadrature error over a trace — exactly the kernel's `quadrature_error` term
    for the same rule, options and dtype.

    error:         [N, O] Σ_t (Δf_t − J̄_t·Δθ_t) per test input and explained output.
    step_max_abs:  [T] the largest |Δf_t − J̄_t·Δθ_t| over rows, per step.
    fT:            [N, O] f(x; θ_T), the scale `rel_error` divides by.
    evaluations_per_step: Jacobian evaluations per test input per step the kernel would spend.
    probe_passes_per_step: forward+backward passes per step that locate kinks (0 without).
    """

    rule: str
    kink_splits: int
    kink_probes: int
    evaluations_per_step: float
    probe_passes_per_step: int
    error: np.ndarray
    step_max_abs: np.ndarray
    fT: np.ndarray
    seconds: float

    @property
    def max_abs(self) -> float:
        """max |f(x; θ_T) − (f(x; θ_0) + Σ_t J̄_t·Δθ_t)| over all rows."""
        return float(np.max(np.abs(self.error)))

    @property
    def rel_error(self) -> float:
        """`max_abs` / max |f(x; θ_T)|."""
        return self.max_abs / max(float(np.max(np.abs(self.fT))), 1e-300)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        return {
            "rule": self.rule,
            "kink_splits": self.kink_splits,
            "kink_probes": self.kink_probes if self.kink_splits else 0,
            "jacobian_evaluations_per_step": self.evaluations_per_step,
            "probe_passes_per_step": self.probe_passes_per_step,
            "max_abs_error": self.max_abs,
            "rel_error": self.rel_error,
            "worst_step_max_abs": float(np.max(self.step_max_abs)),
            "seconds": self.seconds,
        }


def compare_quadrature(
    trace: Any,
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    rules: Sequence[str | RuleSpec],
    *,
    outputs: str | Callable[[Tensor], Tensor] = "all",
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
    output_names: list[str] | None = None,
    config: KernelConfig | None = None,
    **options: Any,
) -> list[QuadratureErrors]:
    """Measure each rule's quadrature error over the whole trace, by forward-mode JVPs.

    Arguments are those of `compute_kernel`; `rules` are specs like "gauss:2", "midpoint:100",
    "gauss:1+kinks" (split at up to 64 kinks per step) or "gauss:2+kinks:8". The config's
    dtype, device, kink_probes and cpu_threads apply; its quadrature and kink_splits are
    replaced by each rule's.
    """
    config = resolve_config(config, options, "compare_quadrature")
    specs = [RuleSpec.parse(r) for r in rules]
    if not specs:
        raise InputError("compare_quadrature needs at least one rule, e.g. ['gauss:2']")
    with open_reader(trace) as reader:
        with KernelProblem.prepare(
            reader,
            model,
            inputs,
            config=config,
            outputs=outputs,
            labels=labels,
            output_names=output_names,
        ) as problem:
            with problem.runtime(), torch.no_grad():
                return _measure(problem, specs, config)


def _measure(
    problem: KernelProblem, specs: list[RuleSpec], config: KernelConfig
) -> list[QuadratureErrors]:
    final = problem.final_state()
    index, _ = problem.output_index(final)
    problem.model.set_modes(False)
    n, steps, names = problem.num_inputs, problem.num_steps, problem.param_names
    test = problem.test_side(0, n, index)
    fT = to_numpy64(test.values(final.params, final.buffers))
    rows = fT.size
    errors = [np.zeros(rows) for _ in specs]
    step_max = [np.zeros(steps) for _ in specs]
    evals = [0.0 for _ in specs]
    seconds = [0.0 for _ in specs]
    points = [s.quadrature.points() for s in specs]
    bar = tqdm(total=steps, desc="quadrature errors", unit="step", disable=not config.progress)
    bundles = SegmentPrefetcher(
        problem.reader, enabled=config.prefetch, replay_args=problem.replay_args()
    )
    try:
        for bundle in bundles:
            for sb in bundle:
                t = sb.step.index
                theta = problem.to_compute_all(sb.step.params)
                nxt = problem.to_compute_all(sb.step.next_params)
                buf = problem.to_compute_all(sb.buffers)
                delta = {k: nxt[k] - theta[k] for k in names}
                theta = {k: theta[k] for k in names}
                path = to_numpy64(test.values(nxt, buf)) - to_numpy64(test.values(theta, buf))
                for j, spec in enumerate(specs):
                    t0 = time.perf_counter()
                    nodes, weights = points[j]
                    lin, spent = test.integrated_jvp(
                        theta,
                        delta,
                        buf,
                        nodes,
                        weights,
                        kink_splits=spec.kink_splits,
                        kink_probes=config.kink_probes,
                    )
                    err = path - to_numpy64(lin)
                    errors[j] += err
                    step_max[j][t] = float(np.max(np.abs(err)))
                    evals[j] += spent
                    seconds[j] += time.perf_counter() - t0
                bar.update(1)
    finally:
        bundles.close()
        bar.close()
    shape = (n, rows // n)
    out = []
    for j, spec in enumerate(specs):
        res = QuadratureErrors(
            rule=str(spec),
            kink_splits=spec.kink_splits,
            kink_probes=config.kink_probes,
            evaluations_per_step=evals[j] / steps,
            probe_passes_per_step=(config.kink_probes + 1) if spec.kink_splits else 0,
            error=errors[j].reshape(shape),
            step_max_abs=step_max[j],
            fT=fT.reshape(shape),
            seconds=seconds[j],
        )
        log.info(
            "%s: %.2f evaluations/step, max_abs=%.3e rel=%.3e",
            res.rule,
            res.evaluations_per_step,
            res.max_abs,
            res.rel_error,
        )
        out.append(res)
    return out


__all__ = ["compare_quadrature", "QuadratureErrors", "RuleSpec", "DEFAULT_KINK_LIMIT"]
