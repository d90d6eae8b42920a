"""Run one recorded forward again at θ_t, in the mode it was recorded in.

The one implementation of "the recorded forward, replayed": replay in the recompute mode
(``gradients="recompute"``), the cotangent codec's decoder and the kernel's training side
(``explaind_kernel.functional`` / ``train_rows`` / ``training_side``) all build on the pieces
below. A forward runs again bit for bit on the device it was recorded on when it sees the same

- parameters and buffers (the buffers are cloned: batch norm's running statistics move on a
  copy, never on the caller's tensors),
- RNG state (CPU, and CUDA when the parameters live on a CUDA device),
- training flag of the root and of every submodule whose flag differed (``mode_overrides``),
- inputs (rebuilt from the stored rows) and buffers, moved to the parameters' device, in
  their recorded dtypes (a bf16 model may keep a float32 buffer, such as rotary
  frequencies); only parameters in another dtype than the model's own (a float64 replay)
  take the floating inputs and buffers into their dtype,
- autocast region (``reforward`` only: the kernel's own replays stay in its compute dtype).

The model is called through ``torch.func.functional_call``, so the user's model object keeps
its parameters and buffers; its training flags are set for the call and restored afterwards,
as is the global RNG state. With ``output_module`` the "model output" is that submodule's
output, captured by a forward hook (``OutputTap``) exactly as the recorder captured it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import codec
from .errors import TraceMismatchError
from .records import ForwardRecord

__all__ = [
    "reforward",
    "recorded_mode",
    "functional_output",
    "OutputTap",
    "to_device",
    "tree_to",
    "tree_leaves",
    "STATE_LOCK",
]

Pytree = Any

#: held while a forward runs in its recorded RNG state, and by whoever changes torch's other
#: process-wide switches that change a forward's bits (the kernel's math-attention sections
#: set the SDPA backend flags): the global RNG and those flags are shared by every thread,
#: and the kernel replays a segment ahead in a thread while its sweep evaluates the model
STATE_LOCK = threading.RLock()


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``t`` on ``device``; a floating tensor also in ``dtype`` unless it is None (others
    keep their dtype)."""
    if t.is_floating_point() and dtype is not None:
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def tree_to(value: Pytree, device: torch.device, dtype: torch.dtype | None) -> Pytree:
    """``to_device`` on every tensor of a tensor / tuple / list / dict tree."""
    if isinstance(value, Tensor):
        return to_device(value, device, dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(tree_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: tree_to(v, device, dtype) for k, v in value.items()}
    return value


def tree_leaves(value: Pytree) -> list[Tensor | None]:
    """Leaves of a tensor / tuple / list / dict tree, dicts in key order (the order of the
    recorded cotangents)."""
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in tree_leaves(v)]
    if isinstance(value, dict):
        return [leaf for k in value for leaf in tree_leaves(value[k])]
    return [value]


class OutputTap:
    """The output of submodule ``name`` of ``module`` at its last call (a forward hook, kept
    until ``close()``); with ``name=None`` the model's own output is the output."""

    def __init__(self, module: nn.Module, name: str | None) -> None:
        self.name = name
        self._seen: list[Any] = []
        self._handle: Any = None
        if name:
            try:
                sub = module.get_submodule(name)
            except AttributeError as e:
                raise TraceMismatchError(
                    f"the trace names output module {name!r}, which this model lacks; "
                    "pass a model of the traced architecture."
                ) from e
            self._handle = sub.register_forward_hook(lambda _m, _i, out: self._seen.append(out))

    def clear(self) -> None:
        """Forget what earlier calls captured (call before each forward)."""
        self._seen.clear()

    def pick(self, out: Any) -> Any:
        """The model output of the forward that returned ``out``."""
        if not self.name:
            return out
        if not self._seen:
            raise TraceMismatchError(
                f"output module {self.name!r} did not run during the forward pass"
            )
        got = self._seen[-1]
        self._seen.clear()
        return got

    def close(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> OutputTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def functional_output(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    args: tuple,
    kwargs: Mapping[str, Any] | None,
    tap: OutputTap,
) -> Pytree:
    """``module(*args, **kwargs)`` with ``params`` and ``buffers`` in place of its own
    (``functional_call``; the module keeps its tensors); the output as ``tap`` picks it."""
    tap.clear()
    out = functional_call(module, {**params, **buffers}, tuple(args), dict(kwargs or {}))
    return tap.pick(out)


def _set_modes(module: nn.Module, training: bool, overrides: Mapping[str, bool] | None) -> None:
    module.train(training)
    for name, mode in (overrides or {}).items():
        module.get_submodule(name).train(mode)


@contextlib.contextmanager
def recorded_mode(
    module: nn.Module, forward: ForwardRecord, device: torch.device
) -> Iterator[None]:
    """Inside: ``module``'s training flags and the RNG state (CPU; CUDA on a CUDA ``device``)
    as when ``forward`` was recorded. Afterwards every module's flag and the RNG state are
    what they were before. Holds ``STATE_LOCK`` throughout, so that two threads replaying
    forwards never see each other's RNG state."""
    flags = [(m, m.training) for m in module.modules()]
    with STATE_LOCK:
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            _set_modes(module, bool(forward.training), getattr(forward, "mode_overrides", None))
            torch.set_rng_state(forward.rng_state)
            cuda_state = getattr(forward, "cuda_rng_state", None)
            if cuda_state is not None and device.type == "cuda":
                torch.cuda.set_rng_state(cuda_state, device)
            yield
        finally:
            torch.set_rng_state(saved_cpu)
            if saved_cuda is not None:
                torch.cuda.set_rng_state(saved_cuda, device)
            for m, flag in flags:
                m.training = flag


def recorded_autocast(forward: ForwardRecord, device: torch.device) -> Any:
    """The autocast region ``forward`` ran in on ``device``'s type (a no-op context when none)."""
    name = (getattr(forward, "autocast", None) or {}).get(device.type)
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=codec.DTYPES[name])


def _device(params: Mapping[str, Tensor]) -> torch.device:
    """The device of ``params`` (of the first one)."""
    first = next(iter(params.values()), None)
    if first is None:
        raise TraceMismatchError("reforward needs the parameters to run the model at; got none")
    return first.device


def reforward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    forward: ForwardRecord,
    *,
    output_module: str | None,
    grad: bool,
) -> Any:
    """The recorded output tree (of ``output_module`` when the trace names one) of one
    recorded forward, run again at ``params`` with the recorded RNG state, train/eval flag,
    mode overrides, autocast region and a clone of ``buffers``, on the params' device and
    dtype (inputs and buffers keep their recorded dtypes unless ``params`` are in another
    dtype than the model's own); global RNG and module modes are restored afterwards; never
    touches the user's model object's parameters (functional_call).

    ``grad=True`` builds the autograd graph (the caller passes parameters that require
    grad); ``grad=False`` runs under ``torch.no_grad()``."""
    device = _device(params)
    own = dict(model.named_parameters())
    cast = next(  # parameters in another dtype than the model's own: a replay in that dtype
        (p.dtype for n, p in params.items() if n in own and p.dtype != own[n].dtype), None
    )
    args = tree_to(tuple(forward.args), device, cast)
    kwargs = tree_to(dict(forward.kwargs), device, cast)
    bufs = {k: to_device(v, device, cast).clone() for k, v in buffers.items()}
    with OutputTap(model, output_module) as tap, recorded_mode(model, forward, device):
        with torch.set_grad_enabled(grad), recorded_autocast(forward, device):
            return functional_output(model, params, bufs, args, kwargs, tap)
