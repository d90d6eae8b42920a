"""The validated problem a kernel computation solves, before any sweep runs.

`KernelProblem.prepare` checks everything that can be checked up front — the trace has steps,
the model matches it, its optimizer has a kernel rule, the test inputs (inputs.py: tensors,
(x, y), a Dataset or DataLoader) are shaped like the training inputs, the slices name traced
parameters — and
returns a frozen object holding the test inputs on the compute device, the output selection,
the slices and the step windows. `compute_kernel`, the sharded path and `compare_quadrature`
all start from it; `plan()` then evaluates the final model once to check the labels against
the target (targets.py) and fix the explained outputs per input and the chunking of the
inputs under the memory budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
from torch import Tensor, nn

from explaind_trace.errors import TraceMismatchError

from .config import KernelConfig
from .errors import EmptyTraceError, InputError, ModelMismatchError
from .functional import FunctionalModel, OutputSelector, primary_output, to_compute, to_numpy64
from .inputs import (
    check_against_trace,
    collect_inputs,
    inputs_digest,
    positional_inputs,
    split_inputs,
)
from .jacobian import TestSide
from .prefetch import codec_cotangents
from .quadrature import Quadrature
from .rules import OptimizerRule, rule_for_trace
from .runtime import resolve_cpu_threads, torch_runtime

log = logging.getLogger(__name__)

SliceSpec = Mapping[str, tuple[str, Any]]


@contextlib.contextmanager
def open_reader(trace: Any) -> Iterator[Any]:
    """The trace as a reader: an open `TraceReader` is used as is (and left open), a path or
    URL is opened for the block and closed after it."""
    if hasattr(trace, "replay") and hasattr(trace, "segments"):
        yield trace
        return
    from explaind_trace import open_trace

    reader = open_trace(trace)
    try:
        yield reader
    finally:
        reader.close()


def trace_fingerprint(reader: Any) -> str:
    """The trace's id (`TraceReader.trace_id`, a hash of its header): results carry it to
    refuse mixing traces. Readers without the property are fingerprinted the same way."""
    value = getattr(reader, "trace_id", None)
    if isinstance(value, str) and value:
        return value
    raw = msgpack.packb(reader.meta.raw, use_bin_type=True)
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


@dataclass(frozen=True)
class State:
    """Parameters and buffers on the compute device (θ and b at one point of the run)."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]


@dataclass(frozen=True)
class RunPlan:
    """What the final model fixes before sweeping: θ_T and b_T, the per-row tensor of every
    test input (labels, predicted classes or zeros), O outputs per input, the [start, stop)
    input chunks, and the final model's predicted class per input (None: no classes)."""

    final: State
    index: Tensor
    width: int
    chunks: tuple[tuple[int, int], ...]
    predicted: np.ndarray | None = None


@dataclass(frozen=True)
class KernelProblem:
    """A kernel computation's inputs, validated against the trace (build with `prepare`).

    Owns a private functional copy of the model (`model`); `close()` (or `with`) releases it.
    """

    reader: Any
    config: KernelConfig
    num_steps: int
    rule: OptimizerRule
    device: torch.device
    dtype: torch.dtype
    param_names: tuple[str, ...]
    param_shapes: dict[str, tuple[int, ...]]
    model: FunctionalModel
    inputs: tuple[Tensor, ...]
    input_keys: tuple[str | None, ...]
    selector: OutputSelector
    labels: Any  # as given (checked against the target by `plan`)
    inputs_digest: str
    slices: dict[str, tuple[str, Tensor]]
    quadrature: Quadrature
    window_edges: tuple[int, ...]
    #: the user's model, kept (not copied, never changed) only when the trace needs it: its
    #: cotangents are stored by the cotangent codec (rebuilt from its recorded-dtype replay),
    #: or its gradients are recomputed (gradients="recompute"/"auto": reader.replay(model=))
    trace_model: nn.Module | None = None

    @classmethod
    def prepare(
        cls,
        reader: Any,
        model: nn.Module,
        inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        *,
        config: KernelConfig,
        outputs: str | Callable[[Tensor], Tensor] = "all",
        labels: Tensor | np.ndarray | Sequence[int] | None = None,
        output_names: list[str] | None = None,
        slices: SliceSpec | None = None,
    ) -> KernelProblem:
        """Validate everything against `reader` (see the module docstring); raises
        EmptyTraceError, ModelMismatchError, UnsupportedOptimizerError or InputError."""
        steps = int(reader.num_steps)
        if steps == 0:
            raise EmptyTraceError(
                "the trace holds no committed optimizer step, so there is nothing to explain; "
                "record at least one optimizer.step() inside explaind_trace.record()."
            )
        try:
            reader.check_model(model)
        except TraceMismatchError as e:  # its message names what differs
            raise ModelMismatchError(str(e)) from e
        rule = rule_for_trace(reader.meta.optimizer.class_name, reader.meta.optimizer.rule)
        device, dtype = config.resolved_device(), config.torch_dtype
        names = tuple(reader.param_names)
        shapes = {p.name: tuple(p.shape) for p in reader.meta.params}
        inputs, labels = collect_inputs(inputs, labels, positional=positional_inputs(reader))
        digest = inputs_digest(inputs, labels, outputs, output_names=output_names, slices=slices)
        keys, xs = split_inputs(inputs)
        check_against_trace(reader, keys, xs)
        selector = OutputSelector(outputs, names=output_names)
        mask_of = _slices(slices or {}, names, shapes, device)
        fm = FunctionalModel(
            model,
            output_module=getattr(reader.meta, "output_module", None),
            device=device,
            dtype=dtype,
        )
        if not reader.finished:
            log.warning(
                "the trace is unfinished (the run was interrupted); explaining the model after "
                "its last committed step %d",
                steps,
            )
        return cls(
            reader=reader,
            config=config,
            num_steps=steps,
            rule=rule,
            device=device,
            dtype=dtype,
            param_names=names,
            param_shapes=shapes,
            model=fm,
            inputs=tuple(to_compute(x, device, dtype) for x in xs),
            input_keys=keys,
            selector=selector,
            labels=labels,
            inputs_digest=digest,
            slices=mask_of,
            quadrature=Quadrature.parse(config.quadrature),
            window_edges=_windows(config.step_windows, steps),
            trace_model=model if codec_cotangents(reader) or _needs_model(reader) else None,
        )

    # ------------------------------------------------------------------ shape
    @property
    def num_inputs(self) -> int:
        """N: test inputs."""
        return int(self.inputs[0].shape[0])

    @property
    def component_names(self) -> list[str]:
        """Parameter tensors first, then the user's slices as "slice:NAME"."""
        return list(self.param_names) + [f"slice:{s}" for s in self.slices]

    @property
    def component_kinds(self) -> list[str]:
        return ["param"] * len(self.param_names) + ["slice"] * len(self.slices)

    @property
    def num_windows(self) -> int:
        return len(self.window_edges) - 1

    def window_of(self, t: int) -> int:
        """The step window holding step t."""
        return int(np.searchsorted(self.window_edges, t, side="right") - 1)

    def replay_args(self) -> dict[str, Any]:
        """Keywords for reader.replay / params_at (the model, when replay recomputes)."""
        if self.trace_model is None or not _needs_model(self.reader):
            return {}
        return {"model": self.trace_model}

    # ---------------------------------------------------------------- tensors
    def to_compute(self, t: Tensor) -> Tensor:
        """A tensor on the compute device (floating tensors in the compute dtype)."""
        return to_compute(t, self.device, self.dtype)

    def to_compute_all(self, d: Mapping[str, Any]) -> dict[str, Any]:
        """`to_compute` on every tensor value of a mapping."""
        return {k: self.to_compute(v) if isinstance(v, Tensor) else v for k, v in d.items()}

    def zeros_like_rows(self, rows: int, name: str) -> Tensor:
        """[rows, *shape of parameter `name`] zeros on the compute device."""
        return torch.zeros(rows, *self.param_shapes[name], dtype=self.dtype, device=self.device)

    def final_state(self) -> State:
        """θ_T and the buffers the final model evaluates with (up to the last committed step
        of an interrupted trace)."""
        final = self.reader.final()
        if final is not None:
            params, buffers = final.params, final.buffers
        else:
            params = self.reader.params_at(self.num_steps, **self.replay_args())
            buffers = self.reader.buffers_at(self.num_steps - 1)
        return State(self.to_compute_all(params), self.to_compute_all(buffers))

    def checkpoint_state(self, t: int) -> State:
        """θ_t and b_t at a stored checkpoint t (a segment boundary), or the end."""
        if t == self.num_steps:
            return self.final_state()
        return State(
            self.to_compute_all(self.reader.checkpoint(t).params),
            self.to_compute_all(self.reader.buffers_at(t)),
        )

    def test_side(self, start: int, stop: int, index: Tensor) -> TestSide:
        """The test side of inputs [start, stop) with their explained-output index."""
        xs = tuple(x[start:stop] for x in self.inputs)
        return TestSide(self.model, self.selector, xs, index[start:stop], keys=self.input_keys)

    # ------------------------------------------------------------------- plan
    def plan(self) -> RunPlan:
        """Evaluate the final model: the output index, O per input and the chunks."""
        final = self.final_state()
        index, predicted = self.output_index(final)
        self.model.set_modes(False)
        width = int(self.test_side(0, 1, index).values(final.params, final.buffers).numel())
        chunk = self._chunk_size(width)
        n = self.num_inputs
        chunks = tuple((lo, min(n, lo + chunk)) for lo in range(0, n, chunk))
        return RunPlan(final, index, width, chunks, predicted)

    def output_index(self, final: State) -> tuple[Tensor, np.ndarray | None]:
        """The per-row tensor the sweep carries (labels, predicted classes or zeros; checked
        against the target and the final output, see targets.py), and the final model's
        predicted class per test input when its output holds classes."""
        out_T = self.final_output(final)
        classes = out_T.dim() == 2 and out_T.shape[-1] > 1
        predicted = to_numpy64(out_T.argmax(dim=-1)).astype(np.int64) if classes else None
        return self.selector.prepare(self.labels, self.num_inputs, lambda: out_T), predicted

    def final_output(self, final: State) -> Tensor:
        """f(x; θ_T) on every test input: the primary output tensor [N, ...]."""
        self.model.set_modes(False)
        args = tuple(x for k, x in zip(self.input_keys, self.inputs) if k is None)
        kwargs = {k: x for k, x in zip(self.input_keys, self.inputs) if k is not None}
        return primary_output(self.model(final.params, final.buffers, args, kwargs))

    def _chunk_size(self, width: int) -> int:
        nparams = sum(int(np.prod(s)) for s in self.param_shapes.values())
        itemsize = torch.finfo(self.dtype).bits // 8
        # jbar, jacobian temporaries, adjoint, carry, z_grad (+ score accumulator)
        copies = 6 + (1 if self.config.keep.param_scores else 0)
        per_input = max(1, width * nparams * itemsize * copies)
        return max(1, min(self.num_inputs, self.config.memory_budget // per_input))

    def cpu_threads(self) -> int | None:
        """The intra-op thread count this run uses on CPU (the config's, "auto" resolved by a
        calibration on this run's [rows, parameters] size; None: torch's as is or not CPU)."""
        if self.device.type != "cpu":
            return None
        nparams = sum(int(np.prod(s)) for s in self.param_shapes.values())
        rows = min(self.num_inputs, 64) * 8  # explained rows of a chunk, before plan() knows O
        return resolve_cpu_threads(self.config.cpu_threads, rows, nparams)

    def runtime(self) -> contextlib.AbstractContextManager[None]:
        """The config's threads and TF32 setting, for the duration of a `with` block."""
        cfg = self.config
        return torch_runtime(self.device, cpu_threads=self.cpu_threads(), allow_tf32=cfg.allow_tf32)

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the functional model copy (its output hook)."""
        self.model.close()

    def __enter__(self) -> KernelProblem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ validation
def _slices(
    spec: SliceSpec,
    names: tuple[str, ...],
    shapes: dict[str, tuple[int, ...]],
    device: torch.device,
) -> dict[str, tuple[str, Tensor]]:
    out: dict[str, tuple[str, Tensor]] = {}
    for name, (pname, index) in spec.items():
        if pname not in shapes:
            raise InputError(
                f"slice {name!r} refers to parameter {pname!r}, which the trace does not "
                f"hold; traced parameters: {list(names)}"
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
        out[name] = (pname, mask.to(device))
    return out


def _needs_model(reader: Any) -> bool:
    """Whether replaying `reader` recomputes gradients (gradients="recompute"/"auto")."""
    return bool(getattr(reader, "needs_model", False))


def _windows(step_windows: int | Sequence[int], steps: int) -> tuple[int, ...]:
    if isinstance(step_windows, int):
        edges = {int(round(x)) for x in np.linspace(0, steps, min(step_windows, steps) + 1)}
    else:
        edges = {0, steps, *[int(e) for e in step_windows if 0 < int(e) < steps]}
    return tuple(sorted(edges))


def optimizer_name(reader: Any) -> str:
    """The optimizer class the trace was recorded with."""
    return str(reader.meta.optimizer.class_name)
