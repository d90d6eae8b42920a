"""The adjoint sweep: a recorded run rewritten exactly as a kernel machine (design.md §1–3).

Sweeping the trace backward, segment by segment (θ_t rebuilt by optimizer replay), each step τ
gets the integrated Jacobian J̄_τ of the explained rows, the optimizer rule turns it into the
adjoint Z_τ, and the recorded training forwards of step τ are replayed to contract per-sample
gradients with Z_τ. Memory: one adjoint per explained row plus one segment of θ_t — it does not
grow with the number of training samples or steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import KernelConfig
from .errors import EmptyTraceError, InputError, ModelMismatchError, UnsupportedOptimizerError
from .functional import FunctionalModel, OutputSelector, primary_output, to_compute
from .inputs import collect_inputs, inputs_digest
from .jacobian import TestSide
from .prefetch import SegmentPrefetcher, StepBundle
from .quadrature import Quadrature
from .result import KernelResult
from .rules import ParamStep, rule_for
from .rules.base import row_dot
from .training_side import TrainingSide

log = logging.getLogger(__name__)

SliceSpec = Mapping[str, tuple[str, Any]]


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
    config / options: a KernelConfig, or its fields as keyword arguments.
    """
    if config is None:
        config = KernelConfig(**options)
    elif options:
        raise InputError("pass either config= or keyword options, not both")
    reader, owned = _open(trace)
    try:
        return _Sweep(reader, model, inputs, outputs, labels, output_names, slices, config).run()
    finally:
        if owned:
            reader.close()


def _open(trace: Any):
    if hasattr(trace, "replay") and hasattr(trace, "segments"):
        return trace, False
    from explaind_trace import open_trace

    return open_trace(trace), True


@dataclass
class _Acc:
    """float64 accumulators of one chunk of rows."""

    rows: int
    steps: int
    comps: int
    windows: int
    keep: Any
    nparams: int

    def __post_init__(self) -> None:
        r, t, c, w = self.rows, self.steps, self.comps, self.windows
        z = np.zeros
        self.step = {k: z((r, t)) for k in _STEP_KEYS}
        self.components = z((r, c))
        self.component_data = z((r, c))
        self.component_window = z((r, c, w)) if self.keep.component_window else None
        self.data = z((r, 64))
        self.sample_component = z((r, 64, self.nparams)) if self.keep.sample_component else None
        self.sample_window = z((r, 64, w)) if self.keep.sample_window else None

    def grow(self, n: int) -> None:
        cap = self.data.shape[1]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        self.data = _pad(self.data, 1, new)
        if self.sample_component is not None:
            self.sample_component = _pad(self.sample_component, 1, new)
        if self.sample_window is not None:
            self.sample_window = _pad(self.sample_window, 1, new)


@dataclass
class _Pass:
    """What stays fixed while one sweep walks its steps backward."""

    test: Any  # TestSide
    train: Any  # TrainingSide
    acc: _Acc
    scores: dict[str, Tensor] | None
    nodes_used: np.ndarray
    carry: dict[str, Tensor | None]
    mode: str
    rows: int


_STEP_KEYS = (
    "data",
    "weight_decay",
    "nondata",
    "initial_state",
    "residual",
    "quadrature_error",
    "buffer_drift",
)


def _pad(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    shape = list(a.shape)
    shape[axis] = size
    out = np.zeros(shape)
    idx = tuple(slice(0, s) for s in a.shape)
    out[idx] = a
    return out


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


class _Sweep:
    def __init__(self, reader, model, inputs, outputs, labels, output_names, slices, config):
        self.reader, self.model, self.config = reader, model, config
        self.T = int(reader.num_steps)
        if self.T == 0:
            raise EmptyTraceError(
                "the trace holds no committed optimizer step, so there is nothing to explain; "
                "record at least one optimizer.step() inside explaind_trace.record()."
            )
        try:
            reader.check_model(model)
        except Exception as e:  # the trace's mismatch error names what differs
            if type(e).__name__ == "TraceMismatchError":
                raise ModelMismatchError(str(e)) from e
            raise
        self.rule = rule_for(_optimizer_class(reader))
        self.device = config.resolved_device()
        self.dtype = config.torch_dtype
        self.names = list(reader.param_names)
        meta = reader.meta
        self.fm = FunctionalModel(
            model,
            output_module=getattr(meta, "output_module", None),
            device=self.device,
            dtype=self.dtype,
        )
        inputs, labels = collect_inputs(inputs, labels, positional=_positional_inputs(reader))
        self.digest = inputs_digest(
            inputs, labels, outputs, output_names=output_names, slices=slices
        )
        self.inputs = self._inputs(inputs)
        self.N = int(self.inputs[0].shape[0])
        self.selector = OutputSelector(outputs, names=output_names)
        self.labels = labels
        self.slices = self._slices(slices or {})
        self.quad = Quadrature.parse(config.quadrature)
        self.edges = self._windows()
        if not reader.finished:
            log.warning(
                "the trace is unfinished (the run was interrupted); explaining the model after "
                "its last committed step %d",
                self.T,
            )

    # ---------------------------------------------------------------- set-up
    def _c(self, t: Tensor) -> Tensor:
        return to_compute(t, self.device, self.dtype)

    def _cd(self, d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self._c(v) if isinstance(v, Tensor) else v for k, v in d.items()}

    def _inputs(self, inputs) -> tuple[Tensor, ...]:
        if isinstance(inputs, Mapping):
            self.input_keys: tuple[str | None, ...] = tuple(str(k) for k in inputs)
            xs = tuple(inputs.values())
        else:
            xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
            self.input_keys = (None,) * len(xs)
        if not xs or not all(isinstance(x, Tensor) for x in xs):
            raise InputError(
                "inputs must be a tensor [N, ...], a tuple of tensors (positional) or a dict of "
                "tensors (keyword inputs, e.g. {'input_ids': ..., 'attention_mask': ...})"
            )
        n = xs[0].shape[0] if xs[0].dim() else 0
        if n == 0 or any(x.dim() == 0 or x.shape[0] != n for x in xs):
            raise InputError(
                f"test inputs must share a non-empty leading batch dimension; got shapes "
                f"{[tuple(x.shape) for x in xs]}"
            )
        self._check_against_trace(xs)
        return tuple(self._c(x) for x in xs)

    def _check_against_trace(self, xs: tuple[Tensor, ...]) -> None:
        try:
            fwds = self.reader.step(0).forwards
        except Exception:  # a trace without forwards has nothing to compare with
            return
        if not fwds:
            return
        f = fwds[0]
        trained = [(None, a) for a in f.args if isinstance(a, Tensor)]
        trained += [(k, v) for k, v in f.kwargs.items() if isinstance(v, Tensor) and v.dim() > 0]
        positional = [a for k, a in trained if k is None]
        named = {k: a for k, a in trained if k is not None}
        given_pos = [k for k in self.input_keys if k is None]
        unknown = [k for k in self.input_keys if k is not None and k not in named]
        if len(positional) != len(given_pos) or unknown:
            raise InputError(
                f"the model was trained with {len(positional)} positional tensor input(s) and "
                f"keyword tensors {sorted(named)} per forward, but the test inputs are "
                f"{len(given_pos)} positional and keywords {sorted(k for k in self.input_keys if k)}; "
                "pass positional inputs as a tensor or tuple in the same order, and keyword inputs "
                "as a dict (e.g. {'input_ids': ...})."
            )
        it = iter(positional)
        trained = [(k, named[k] if k is not None else next(it)) for k in self.input_keys]
        for (k, a), x in zip(trained, xs):
            j = k or 0
            if (
                tuple(a.shape[1:]) != tuple(x.shape[1:])
                or a.is_floating_point() != x.is_floating_point()
            ):
                raise InputError(
                    f"test input {j} has shape {tuple(x.shape)} ({x.dtype}) but the model was "
                    f"trained on rows of shape {tuple(a.shape[1:])} ({a.dtype}); pass test inputs "
                    "shaped like the training inputs, batch first."
                )

    def _slices(self, spec: SliceSpec) -> dict[str, tuple[str, Tensor]]:
        shapes = dict(zip(self.names, [tuple(s) for s in _param_shapes(self.reader)]))
        out: dict[str, tuple[str, Tensor]] = {}
        for name, (pname, index) in spec.items():
            if pname not in shapes:
                raise InputError(
                    f"slice {name!r} refers to parameter {pname!r}, which the trace does not "
                    f"hold; traced parameters: {self.names}"
                )
            mask = torch.zeros(shapes[pname], dtype=torch.bool)
            if isinstance(index, Tensor) and index.dtype == torch.bool:
                if tuple(index.shape) != shapes[pname]:
                    raise InputError(
                        f"slice {name!r}: mask shape {tuple(index.shape)} differs from "
                        f"{pname!r} shape {shapes[pname]}"
                    )
                mask = index.clone()
            else:
                mask[index] = True
            out[name] = (pname, mask.to(self.device))
        return out

    def _windows(self) -> list[int]:
        sw = self.config.step_windows
        if isinstance(sw, int):
            edges = sorted({int(round(x)) for x in np.linspace(0, self.T, min(sw, self.T) + 1)})
        else:
            edges = sorted({0, self.T, *[int(e) for e in sw if 0 < int(e) < self.T]})
        return edges

    def _chunk_size(self, width: int) -> int:
        nparams = sum(int(np.prod(s)) for s in _param_shapes(self.reader))
        itemsize = torch.finfo(self.dtype).bits // 8
        # jbar, jacobian temporaries, adjoint, carry, z_grad (+ score accumulator)
        copies = 6 + (1 if self.config.keep.param_scores else 0)
        per_input = max(1, width * nparams * itemsize * copies)
        return max(1, min(self.N, self.config.memory_budget // per_input))

    # ------------------------------------------------------------------- run
    def load_final(self) -> None:
        """θ_T and the buffers the final model evaluates with (up to the last committed step
        of an interrupted trace)."""
        final = self.reader.final()
        if final is not None:
            theta_T, buf_T = final.params, final.buffers
        else:
            theta_T, buf_T = self.reader.params_at(self.T), self.reader.buffers_at(self.T - 1)
        self.theta_T = self._cd(theta_T)
        self.buf_T = self._cd(buf_T)

    def run(self) -> KernelResult:
        cfg = self.config
        tf32 = _tf32(cfg.allow_tf32) if self.device.type == "cuda" else contextlib.nullcontext()
        with (
            tf32,
            _threads(cfg.cpu_threads if self.device.type == "cpu" else None),
            torch.no_grad(),
        ):
            self.load_final()
            index = self._index()
            self.fm.set_modes(False)
            width = self._width(index)
            chunk = self._chunk_size(width)
            pieces = []
            bar = tqdm(
                total=self.T * math.ceil(self.N / chunk),
                desc="path kernel",
                unit="step",
                disable=not cfg.progress,
            )
            try:
                self.sample_index: dict[str, int] = {}
                for start in range(0, self.N, chunk):
                    stop = min(self.N, start + chunk)
                    xs = tuple(x[start:stop] for x in self.inputs)
                    piece = self._sweep(xs, index[start:stop], width, bar)
                    if "scores_raw" in piece:
                        piece["scores"] = {
                            n: _np(v.abs().sum(0)) for n, v in piece.pop("scores_raw").items()
                        }
                    pieces.append(piece)
            finally:
                bar.close()
                self.fm.close()
        return self._assemble(pieces, width)

    def _width(self, index: Tensor) -> int:
        """O: explained outputs per test input (from one forward of the first input)."""
        first = tuple(x[:1] for x in self.inputs)
        side = TestSide(self.fm, self.selector, first, index[:1], keys=self.input_keys)
        return int(side.values(self.theta_T, self.buf_T).numel())

    def _index(self) -> Tensor:
        """The per-row tensor the sweep carries: labels, predicted classes or zeros (checked
        against the target and the final output; see targets.py)."""
        out_T = self._final_output()
        classes = out_T.dim() == 2 and out_T.shape[-1] > 1
        self.predicted = _np(out_T.argmax(dim=-1)).astype(np.int64) if classes else None
        return self.selector.prepare(self.labels, self.N, lambda: out_T)

    def _final_output(self) -> Tensor:
        """f(x; θ_T) on every test input: the primary output tensor [N, ...]."""
        self.fm.set_modes(False)
        side = TestSide(
            self.fm,
            self.selector,
            self.inputs,
            torch.zeros(self.N, dtype=torch.long),
            keys=self.input_keys,
        )
        return primary_output(side._call(self.theta_T, self.buf_T, self.inputs))

    # ------------------------------------------------------------- the sweep
    def _sweep(
        self,
        xs,
        index,
        width: int,
        bar,
        *,
        segments: list[tuple[int, int]] | None = None,
        carry_in: dict[str, Tensor] | None = None,
        mode: str = "full",
    ) -> dict[str, Any]:
        """Sweep `segments` (default: the whole trace) backward.

        mode "full": everything; "correct": only the terms linear in the boundary adjoint
        `carry_in` (J̄ = 0: data, non-data, coupled decay, initial state); "propagate": only
        carry `carry_in` through the span (no training side), for the sharded scan.
        """
        cfg = self.config
        segments = list(self.reader.segments()) if segments is None else segments
        test = TestSide(self.fm, self.selector, xs, index, keys=self.input_keys)
        train = TrainingSide(self.fm, block_rows=cfg.block_rows, mode=cfg.training_mode)
        rows = int(xs[0].shape[0]) * width
        comp_names = self.names + [f"slice:{s}" for s in self.slices]
        acc = _Acc(rows, self.T, len(comp_names), len(self.edges) - 1, cfg.keep, len(self.names))
        scores = (
            {
                n: torch.zeros(rows, *self.theta_T[n].shape, dtype=self.dtype, device=self.device)
                for n in self.names
            }
            if cfg.keep.param_scores and mode == "full"
            else None
        )
        nodes_used = np.zeros(self.T)
        carry: dict[str, Tensor | None] = {n: None for n in self.names}
        if carry_in is not None:
            carry.update({n: v for n, v in carry_in.items()})
        end = segments[-1][1]
        if end == self.T:
            theta_next, buf_next = self.theta_T, self.buf_T
        else:
            theta_next = self._cd(self.reader.checkpoint(end).params)
            buf_next = self._cd(self.reader.buffers_at(end))
        f_T = test.values(theta_next, buf_next) if mode == "full" else None
        f_next = f_T
        ps = _Pass(test, train, acc, scores, nodes_used, carry, mode, rows)
        bundles = SegmentPrefetcher(self.reader, enabled=cfg.prefetch, segments=segments)
        try:
            for bundle in bundles:
                for sb in reversed(bundle):
                    f_next = self._step(sb, ps, theta_next, buf_next, f_next)
                    theta_next, buf_next = self._cd(sb.step.params), self._cd(sb.buffers)
                    if bar is not None:
                        bar.update(1)
        finally:
            bundles.close()
        out = {
            "f0": _np(f_next) if f_next is not None else None,
            "fT": _np(f_T) if f_T is not None else None,
            "acc": acc,
            "nodes": nodes_used,
            "carry": carry,
        }
        if scores is not None:
            out["scores_raw"] = scores
        return out

    def _step(self, sb: StepBundle, ps: _Pass, theta_next, buf_next, f_next):
        """One step backward; returns f(θ_t, b_t) for the step before it."""
        t = sb.step.index
        test, acc, scores = ps.test, ps.acc, ps.scores
        theta = self._cd(sb.step.params)
        buf = self._cd(sb.buffers)
        delta = {n: theta_next[n] - theta[n] for n in self.names}
        if ps.mode != "full":
            z_grad, terms = self._rule_terms(sb, ps, theta, delta, None)
            if ps.mode == "correct":
                self._record_sources(sb, ps, theta, z_grad, terms)
            return None
        f_a = test.values(theta, buf)
        f_b = test.values(theta_next, buf)
        path = _np(f_b) - _np(f_a)
        drift = _np(f_next) - _np(f_b)

        jbar, lin, evals = self._integrate(test, theta, delta, buf, f_a, f_b)
        ps.nodes_used[t] = evals
        comp = {n: row_dot(jbar[n], delta[n]) for n in self.names}
        z_grad, terms = self._rule_terms(sb, ps, theta, delta, jbar)

        w = int(np.searchsorted(self.edges, t, side="right") - 1)
        for c, n in enumerate(self.names):
            v = _np(comp[n])
            acc.components[:, c] += v
            if acc.component_window is not None:
                acc.component_window[:, c, w] += v
        for j, (_sname, (pname, mask)) in enumerate(self.slices.items()):
            c = len(self.names) + j
            v = _np(row_dot(jbar[pname] * mask, delta[pname]))
            acc.components[:, c] += v
            if acc.component_window is not None:
                acc.component_window[:, c, w] += v
        if scores is not None:
            for n in self.names:
                scores[n] += jbar[n] * delta[n]
        del jbar

        self._record_sources(sb, ps, theta, z_grad, terms)
        acc.step["residual"][:, t] = terms["residual"]
        acc.step["quadrature_error"][:, t] = path - lin
        acc.step["buffer_drift"][:, t] = drift
        return f_a

    def _training(self, sb, train, acc, theta, z_grad, t) -> np.ndarray:
        """Replay each recorded forward of step t; accumulate K(x; i, t). Returns Σ_i K."""
        rec = sb.step.record
        w = int(np.searchsorted(self.edges, t, side="right") - 1)
        data_t = np.zeros(acc.rows)
        if z_grad:
            prev_buf = sb.buffers_before
            for fwd in rec.forwards:
                if getattr(fwd, "buffers", None) is not None:
                    prev_buf = fwd.buffers
                prods = train.products(
                    theta,
                    self._cd(prev_buf),
                    fwd,
                    z_grad,
                    per_param=acc.sample_component is not None,
                )
                k = _np(prods.k)  # [B, R]
                cols = [self._sample(sid, acc) for sid in fwd.ids]
                np.add.at(acc.data.T, cols, k)
                if acc.sample_window is not None:
                    np.add.at(acc.sample_window[:, :, w].T, cols, k)
                if acc.sample_component is not None:
                    for c, n in enumerate(self.names):
                        if n in prods.k_param:
                            np.add.at(acc.sample_component[:, :, c].T, cols, _np(prods.k_param[n]))
                data_t += k.sum(0)
                for c, n in enumerate(self.names):
                    if n in prods.grad_sum:
                        acc.component_data[:, c] += _np(row_dot(z_grad[n], prods.grad_sum[n]))
                for j, (_sname, (pname, mask)) in enumerate(self.slices.items()):
                    if pname in prods.grad_sum:
                        v = row_dot(z_grad[pname] * mask, prods.grad_sum[pname])
                        acc.component_data[:, len(self.names) + j] += _np(v)

        return data_t

    def _rule_terms(self, sb, ps: _Pass, theta, delta, jbar):
        """Run the optimizer rule over the parameter tensors of step t (updating the carried
        adjoints). `jbar=None` means J̄ = 0: only what the carried adjoint contributes (the
        sharded scan and correction passes). Returns (z_grad, per-row source terms)."""
        rs, t, rule, rec, rows = sb.step, sb.step.index, self.rule, sb.step.record, ps.rows
        carry = ps.carry
        z_grad: dict[str, Tensor] = {}
        terms = {
            k: np.zeros(rows) for k in ("weight_decay", "total_g", "initial_state", "residual")
        }
        for n in self.names:
            if jbar is None and carry[n] is None:
                continue
            if jbar is not None:
                jb = jbar[n]
            else:
                jb = torch.zeros(rows, *theta[n].shape, dtype=self.dtype, device=self.device)
            g = rec.grads.get(n)
            g = self._c(g) if g is not None else None
            before = self._cd(rs.state_before.get(n, {}))
            after = self._cd(rs.state_after.get(n, {}))
            hp = rec.groups[rec.group_of[n]]
            out = rule.backward(
                ParamStep(n, jb, theta[n], delta[n], g, hp, before, after), carry[n]
            )
            carry[n] = out.carry
            if ps.mode == "propagate":
                continue
            terms["weight_decay"] += _np(out.weight_decay)
            if jbar is not None:
                terms["residual"] += _np(row_dot(jb, delta[n] - out.recon))
            if out.z_grad is not None and g is not None:
                z_grad[n] = out.z_grad
                terms["total_g"] += _np(row_dot(out.z_grad, g))
            if t == 0:
                terms["initial_state"] += _np(rule.initial_state_term(carry[n], before, rows, jb))
        return z_grad, terms

    def _record_sources(self, sb, ps: _Pass, theta, z_grad, terms) -> None:
        """Replay step t's training forwards and write its source-step terms."""
        t = sb.step.index
        data_t = self._training(sb, ps.train, ps.acc, theta, z_grad, t)
        st = ps.acc.step
        st["data"][:, t] = data_t
        st["weight_decay"][:, t] = terms["weight_decay"]
        st["nondata"][:, t] = terms["total_g"] - data_t
        st["initial_state"][:, t] = terms["initial_state"]

    def _integrate(self, test, theta, delta, buf, f_a, f_b):
        """J̄ over [0, 1] by the quadrature rule. With `adaptive_tol`, the sub-segment with the
        largest measured error |Δf − J̄·Δθ| (Δf on a sub-segment is exact: two forward passes)
        is bisected first, until every piece is within tol·length or `max_nodes` Jacobian
        evaluations per step are spent."""
        nodes, weights = self.quad.points()
        tol, budget = self.config.adaptive_tol, self.config.max_nodes
        order = itertools.count()  # tiebreak: heap entries never compare tensors

        def piece(a: float, b: float, fa: Tensor, fb: Tensor):
            start = {k: theta[k] + a * delta[k] for k in theta}
            seg = {k: (b - a) * delta[k] for k in delta}
            jb, spent = test.integrated_jacobian(
                start,
                seg,
                buf,
                nodes,
                weights,
                kink_splits=self.config.kink_splits,
                kink_probes=self.config.kink_probes,
            )
            for k in jb:
                jb[k].mul_(b - a)
            lin = sum(_np(row_dot(jb[n], delta[n])) for n in self.names)
            err = float(np.max(np.abs(_np(fb) - _np(fa) - lin))) if tol is not None else 0.0
            key = -(err - tol * (b - a)) if tol is not None else 0.0
            return (key, next(order), a, b, fa, fb, jb, lin, spent)

        heap = [piece(0.0, 1.0, f_a, f_b)]
        evals = heap[0][-1]
        while tol is not None and heap[0][0] < 0 and evals + 2 * len(nodes) <= budget:
            _, _, a, b, fa, fb, _, _, spent = heapq.heappop(heap)
            m = 0.5 * (a + b)
            fm = test.values({k: theta[k] + m * delta[k] for k in theta}, buf)
            left, right = piece(a, m, fa, fm), piece(m, b, fm, fb)
            heapq.heappush(heap, left)
            heapq.heappush(heap, right)
            evals += left[-1] + right[-1] - spent
        total: dict[str, Tensor] = {}
        total_lin = np.zeros(f_a.numel())
        for *_, jb, lin, _spent in heap:
            total_lin += lin
            for k, v in jb.items():
                total[k] = total[k].add_(v) if k in total else v
        return total, total_lin, evals

    def _sample(self, sid: str, acc: _Acc) -> int:
        j = self.sample_index.get(sid)
        if j is None:
            j = self.sample_index[sid] = len(self.sample_index)
        acc.grow(j + 1)
        return j

    # -------------------------------------------------------------- assemble
    def _assemble(self, pieces: list[dict[str, Any]], width: int) -> KernelResult:
        S = len(self.sample_index)

        def cat(get) -> np.ndarray:
            arrs = [get(p) for p in pieces]
            full = np.concatenate(arrs, axis=0)
            return full.reshape(self.N, width, *full.shape[1:])

        step = {k: cat(lambda p, k=k: p["acc"].step[k]) for k in _STEP_KEYS}
        data = cat(lambda p: p["acc"].data[:, :S]) if S else np.zeros((self.N, width, 0))
        keep = self.config.keep
        comp_names = self.names + [f"slice:{s}" for s in self.slices]
        scores = None
        if keep.param_scores:
            scores = {n: sum(p["scores"][n] for p in pieces) for n in self.names}
        res = KernelResult(
            trace_id=trace_fingerprint(self.reader),
            config=self.config.to_dict(),
            output_names=self.selector.output_names(width),
            sample_ids=sorted(self.sample_index, key=self.sample_index.get),
            component_names=comp_names,
            component_kinds=["param"] * len(self.names) + ["slice"] * len(self.slices),
            window_edges=list(self.edges),
            num_steps=self.T,
            f0=cat(lambda p: p["f0"][:, None]).reshape(self.N, width),
            fT=cat(lambda p: p["fT"][:, None]).reshape(self.N, width),
            weight_decay=step["weight_decay"].sum(-1),
            nondata=step["nondata"].sum(-1),
            initial_state=step["initial_state"].sum(-1),
            residual=step["residual"].sum(-1),
            quadrature_error=step["quadrature_error"].sum(-1),
            buffer_drift=step["buffer_drift"].sum(-1),
            data=data,
            step_data=step["data"],
            step_weight_decay=step["weight_decay"],
            step_nondata=step["nondata"],
            step_initial_state=step["initial_state"],
            step_residual=step["residual"],
            step_quadrature_error=step["quadrature_error"],
            step_buffer_drift=step["buffer_drift"],
            components=cat(lambda p: p["acc"].components),
            component_data=cat(lambda p: p["acc"].component_data),
            sample_component=cat(lambda p: p["acc"].sample_component[:, :S])
            if keep.sample_component
            else None,
            sample_window=cat(lambda p: p["acc"].sample_window[:, :S])
            if keep.sample_window
            else None,
            component_window=cat(lambda p: p["acc"].component_window)
            if keep.component_window
            else None,
            param_scores=scores,
            step_nodes=pieces[0]["nodes"] if pieces else None,
            extra={
                "finished": bool(self.reader.finished),
                "optimizer": _optimizer_name(self.reader),
                "device": str(self.device),
                **self.selector.describe(self.predicted),
                "inputs_digest": self.digest,
            },
        )
        max_abs, rel = res.completeness()
        log.info("path kernel done: %s", res.completeness_line())
        return res


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(old)


def _positional_inputs(reader) -> int | None:
    """Positional tensor inputs of the first recorded forward (None: no forward recorded)."""
    fwds = reader.step(0).forwards
    if not fwds:
        return None
    return sum(isinstance(a, Tensor) for a in fwds[0].args)


def _param_shapes(reader) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in reader.meta.params]


def trace_fingerprint(reader) -> str:
    """The trace's id (`TraceReader.trace_id`, a hash of its header): results carry it to
    refuse mixing traces. Readers without the property are fingerprinted the same way."""
    value = getattr(reader, "trace_id", None)
    if isinstance(value, str) and value:
        return value
    raw = msgpack.packb(reader.meta.raw, use_bin_type=True)
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _optimizer_name(reader) -> str:
    return str(reader.meta.optimizer.class_name)


def _optimizer_class(reader) -> type:
    from explaind_trace.optimizers import optimizer_class_by_name

    name = _optimizer_name(reader)
    try:
        return optimizer_class_by_name(name, reader.meta.optimizer.rule)
    except Exception as e:
        raise UnsupportedOptimizerError(
            f"the trace was recorded with optimizer {name!r}, which is not registered here ({e}); "
            "register it with explaind_trace.register_optimizer and "
            "explaind_kernel.register_rule."
        ) from e
