"""A private copy of the user's model, called functionally at any θ and buffer state.

The user's model is never touched: it is deep-copied once, moved to the compute device and
dtype, and every evaluation passes parameters and buffers explicitly (torch.func.functional_call).
When the trace names an `output` submodule, its output (captured by a forward hook on the copy)
is "the model output", exactly as during recording.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import InputError

Pytree = Any


def to_compute(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Move a tensor to the compute device; floating tensors also to the compute dtype."""
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def tree_to(value: Pytree, device: torch.device, dtype: torch.dtype) -> Pytree:
    if isinstance(value, Tensor):
        return to_compute(value, device, dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(tree_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: tree_to(v, device, dtype) for k, v in value.items()}
    return value


def tree_leaves(value: Pytree) -> list[Tensor | None]:
    """Leaves of a tensor / tuple / list / dict tree, dicts in key order."""
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in tree_leaves(v)]
    if isinstance(value, dict):
        return [leaf for k in value for leaf in tree_leaves(value[k])]
    return [value]


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
        f"the model output ({type(out).__name__}) holds no tensor to explain; pass `explain=` "
        "with a function mapping the output to an [N, O] tensor."
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
        self._captured: list[Any] = []
        self._hook = None
        if output_module:
            try:
                sub = self.module.get_submodule(output_module)
            except AttributeError as e:
                raise InputError(
                    f"the trace names output module {output_module!r}, which this model lacks; "
                    "pass a model of the traced architecture."
                ) from e
            self._hook = sub.register_forward_hook(lambda _m, _i, out: self._captured.append(out))
        self.output_module = output_module

    def __call__(
        self,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        args: tuple,
        kwargs: Mapping[str, Any] | None = None,
    ) -> Pytree:
        self._captured.clear()
        out = functional_call(self.module, {**params, **buffers}, tuple(args), dict(kwargs or {}))
        if self.output_module:
            if not self._captured:
                raise InputError(
                    f"output module {self.output_module!r} did not run during the forward pass"
                )
            out = self._captured[-1]
            self._captured.clear()
        return out

    def set_modes(self, training: bool, overrides: Mapping[str, bool] | None = None) -> None:
        self.module.train(training)
        for name, mode in (overrides or {}).items():
            self.module.get_submodule(name).train(mode)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class OutputSelector:
    """Maps a model output to the explained values [n, O] for a fixed choice per test input.

    `index` (shape [N], long) is the per-input output index for "predicted"/"label" modes; for
    "all" and callables it is ignored.
    """

    def __init__(
        self,
        mode: str | Callable[[Tensor], Tensor],
        *,
        names: list[str] | None = None,
    ) -> None:
        if callable(mode):
            self.mode, self.fn = "function", mode
        elif mode in ("all", "predicted", "label"):
            self.mode, self.fn = mode, None
        else:
            raise InputError(
                f"outputs={mode!r} is not understood; use 'all', 'predicted', 'label' or a "
                "function mapping the model output [n, ...] to [n, O]."
            )
        self.names = names

    def __call__(self, out: Pytree, index: Tensor) -> Tensor:
        y = primary_output(out)
        if self.mode == "function":
            v = self.fn(y)  # type: ignore[misc]
            return v.unsqueeze(-1) if v.dim() == 1 else v.reshape(v.shape[0], -1)
        flat = y.reshape(y.shape[0], -1)
        if self.mode == "all":
            return flat
        return flat.gather(1, index.reshape(-1, 1))

    def output_names(self, width: int) -> list[str]:
        if self.names is not None:
            return list(self.names)
        if self.mode == "all":
            return [f"output[{j}]" for j in range(width)]
        if self.mode == "function":
            return ["explained"] if width == 1 else [f"explained[{j}]" for j in range(width)]
        return [self.mode]
