"""A private copy of the user's model, called functionally at any θ and buffer state.

The user's model is never touched: it is deep-copied once, moved to the compute device and
dtype, and every evaluation passes parameters and buffers explicitly (torch.func.functional_call).
When the trace names an `output` submodule, its output (captured by a forward hook on the copy)
is "the model output", exactly as during recording. The functional call, the output hook and the
recorded mode of a replayed forward are explaind_trace.reforward's, shared with the trace side.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explaind_trace.errors import TraceMismatchError
from explaind_trace.reforward import (
    OutputTap,
    functional_output,
    recorded_mode,
    to_device,
)

from .errors import InputError
from .targets import Target, check_labels, resolve_target, row_labels

Pytree = Any


def to_compute(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Move a tensor to the compute device; floating tensors also to the compute dtype."""
    return to_device(t, device, dtype)


def to_numpy64(t: Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array on the host (the kernel's accumulators' type)."""
    return t.detach().to("cpu", torch.float64).numpy()


def primary_output(out: Pytree) -> Tensor:
    """The tensor an explained output is read from: the tensor itself, the first tensor of a
    tuple/list, or `logits` (else the first tensor) of a dict."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    if isinstance(out, (list, tuple)):
        for v in out:
            if isinstance(v, Tensor):
                return v
    raise InputError(
        f"the model output ({type(out).__name__}) holds no tensor to explain; name the "
        "submodule whose output to explain with record(output=...), or return a tensor."
    )


class FunctionalModel:
    """Evaluate a private copy of `model` at given parameters and buffers."""

    def __init__(
        self,
        model: nn.Module,
        *,
        output_module: str | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.module = copy.deepcopy(model).to(device=device)
        for _name, t in list(self.module.named_parameters()) + list(self.module.named_buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.device, self.dtype = device, dtype
        self._row_captures: dict[tuple[str, ...], Any] = {}
        try:
            self._tap: OutputTap | None = OutputTap(self.module, output_module)
        except TraceMismatchError as e:
            raise InputError(str(e)) from e
        self.output_module = output_module

    def __call__(
        self,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        args: tuple,
        kwargs: Mapping[str, Any] | None = None,
    ) -> Pytree:
        assert self._tap is not None, "FunctionalModel used after close()"
        try:
            return functional_output(self.module, params, buffers, args, kwargs, self._tap)
        except TraceMismatchError as e:
            raise InputError(str(e)) from e

    def set_modes(self, training: bool, overrides: Mapping[str, bool] | None = None) -> None:
        self.module.train(training)
        for name, mode in (overrides or {}).items():
            self.module.get_submodule(name).train(mode)

    @contextlib.contextmanager
    def recorded_mode(self, forward) -> Iterator[None]:
        """A context in which the copy runs `forward` (explaind_trace.ForwardRecord) in its
        recorded RNG state and module modes; afterwards the RNG state is restored and the
        copy is in eval mode (where the kernel's test side evaluates it)."""
        try:
            with recorded_mode(self.module, forward, self.device):
                yield
        finally:
            self.set_modes(False)

    def row_capture(self, names: list[str]):
        """The per-row gradient hooks (persample.RowCapture) for parameters `names`, made once."""
        key = tuple(names)
        if key not in self._row_captures:
            from .persample import RowCapture

            self._row_captures[key] = RowCapture(self.module, list(names))
            if self._tap is not None and self.output_module:
                # the output module's hook must run after the row capture's taps, or it
                # captures the untapped output and the rows get no gradient through it
                self._tap.close()
                self._tap = OutputTap(self.module, self.output_module)
        return self._row_captures[key]

    def close(self) -> None:
        """Remove every hook this object put on its private copy."""
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        for cap in self._row_captures.values():
            cap.close()
        self._row_captures.clear()


class OutputSelector:
    """Maps a model output to the explained values [n, O] through a target (targets.py).

    The sweep carries one tensor per test input alongside it (`labels` below): the labels,
    the final model's argmax for "predicted", or zeros. `prepare` makes that tensor once,
    checking the labels against the target and the final output.
    """

    def __init__(
        self,
        mode: str | Target | Callable[..., Tensor],
        *,
        names: list[str] | None = None,
    ) -> None:
        self.target = resolve_target(mode)
        self.names = names
        self.has_labels = False
        self.labels: Tensor | None = None

    @property
    def mode(self) -> str:
        """The target's name ("all", "predicted", "loss", ... or the callable's)."""
        return self.target.name

    def prepare(self, labels: Any, n: int, final_output: Callable[[], Tensor]) -> Tensor:
        """The per-row tensor for the sweep; `final_output()` gives f(x; θ_T) [n, ...] (the
        primary output) and is called only when the target needs it."""
        t = self.target
        given = as_labels(labels)
        needs_output = t.rows == "predicted" or t.specialise is not None or t.needs_labels
        out_T = final_output() if needs_output else None
        check_labels(t, given, n, out_T)
        if t.specialise is not None and out_T is not None:
            self.target = t.specialise(t, out_T)
        self.has_labels = given is not None or t.rows == "predicted"
        self.labels = given
        rows = row_labels(self.target, given, out_T, n)
        return rows.to(out_T.device) if out_T is not None else rows

    def __call__(self, out: Pytree, labels: Tensor) -> Tensor:
        y = primary_output(out)
        v = self.target.fn(y, labels if self.has_labels else None)
        if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != y.shape[0]:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InputError(
                f"outputs={self.target.name!r} returned {got} for a chunk of {y.shape[0]} test "
                "inputs; a target must return [n] or [n, O] (one row per test input)"
            )
        return v.unsqueeze(-1) if v.dim() == 1 else v.reshape(v.shape[0], -1)

    def describe(self, predicted: Any = None) -> dict[str, Any]:
        """What a result records about its target: the name, the labels (when numeric) and
        the final model's predicted class per test input (when the output holds classes)."""
        out: dict[str, Any] = {"target": self.target.name}
        if self.labels is not None and not self.labels.is_complex():
            out["labels"] = self.labels.detach().to("cpu").numpy()
        if predicted is not None:
            out["predicted"] = predicted
        return out

    def output_names(self, width: int) -> list[str]:
        if self.names is not None:
            return list(self.names)
        return self.target.names(width)


def as_labels(labels: Any) -> Tensor | None:
    """Labels as a tensor (from a tensor, numpy array or sequence), or None."""
    if labels is None or isinstance(labels, Tensor):
        return labels
    try:
        import numpy as np

        return torch.as_tensor(np.asarray(labels))
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"labels must be a tensor, a numpy array or a sequence of numbers, got "
            f"{type(labels).__name__} ({e})"
        ) from e
