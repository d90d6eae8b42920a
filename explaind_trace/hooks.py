"""What the recorder's hooks capture: inputs, output cotangents, gradient identity.

Nothing here changes a value the training loop sees: inputs are copied, tensor hooks
return ``None``, RNG states are read, not set.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import codec
from .errors import RecordingError, TraceCorruptError
from .packing import cpu_copy
from .records import CapturedForward
from .trees import capture_inputs, output_tree

__all__ = [
    "find_batch_size",
    "capture_inputs",
    "in_backward",
    "current_grad_scale",
    "dense_grads",
    "OutputCapture",
    "GradTracker",
    "prune_pending",
    "autocast_state",
    "graph_task",
]


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def find_batch_size(args: tuple, kwargs: dict[str, Any]) -> tuple[int, torch.device]:
    """Batch size B (dim 0 of the first tensor input with at least one dim) and its device."""
    for t in _tensors((args, kwargs)):
        if t.dim() >= 1:
            return int(t.shape[0]), t.device
    raise RecordingError(
        "the model was called without a tensor input that has a batch dimension, so its "
        "samples cannot be recorded. Pass the batch as a tensor argument (dim 0 = batch)."
    )


def in_backward() -> bool:
    """Whether autograd is running a backward pass (e.g. recomputing a checkpointed forward)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


def current_grad_scale(scaler: Any) -> torch.Tensor | None:
    """The loss scale a ``GradScaler`` applies now (None without an enabled scaler)."""
    if scaler is None or not scaler.is_enabled():
        return None
    t = getattr(scaler, "_scale", None)
    if isinstance(t, torch.Tensor):
        return t.detach().clone()
    return torch.tensor(float(scaler.get_scale()))


def autocast_state() -> dict[str, str] | None:
    """``{device type: dtype name}`` of the autocast regions active now (None: none), so that
    a forward can be run again under the same casts (``reforward``)."""
    out = {}
    for kind in ("cpu", "cuda"):
        if torch.is_autocast_enabled(kind):
            out[kind] = codec.dtype_name(torch.get_autocast_dtype(kind))
    return out or None


def dense_grads(params: dict[str, torch.nn.Parameter]) -> list[tuple[str, torch.Tensor]]:
    """``(name, .grad)`` of the parameters that have a gradient; refuses sparse ones."""
    out = []
    for n, p in params.items():
        g = p.grad
        if g is None:
            continue
        if g.layout != torch.strided:
            raise RecordingError(
                f"parameter {n!r} has a {g.layout} gradient; only dense gradients are supported"
            )
        out.append((n, g))
    return out


def graph_task() -> int | None:
    """Id of the backward pass running now (torch's graph task), None where unavailable."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return int(fn()) if fn is not None else None


class OutputCapture:
    """Cotangent accumulation for one recorded forward (sums over repeated backwards).

    ``keep_outputs``: also hand over the output leaves that receive a cotangent (for the
    cotangent codec, which encodes a cotangent from its logits); a leaf changed in place
    after the forward is not handed over (its cotangent is then stored by the tensor codec).
    ``on_backward``: called when a cotangent arrives (the recorder opens the writer's gate).
    """

    def __init__(
        self,
        captured: CapturedForward,
        scale_fn: Callable[[], torch.Tensor | None],
        *,
        keep_outputs: bool = False,
        on_backward: Callable[[], None] | None = None,
    ):
        self.captured = captured
        self._on_backward = on_backward
        self.keep_outputs = keep_outputs
        self._outs: list[tuple[torch.Tensor, int] | None] = []
        self.received = False
        self.task: int | None = None  # the backward pass (graph task) its cotangent came in
        self.attached = False
        self.output_seen = False  # output= mode: the submodule's hook already ran
        self._scale_fn = scale_fn
        self._acc: list[torch.Tensor | None] = []
        self._scale: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._live = True

    def attach(self, output: Any, *, where: str) -> bool:
        """Register cotangent hooks on the output leaves; False if none requires grad."""
        tree, leaves = output_tree(output)
        # a tensor listed twice gets its cotangent once (at its first position), so that
        # summing J^T c over the leaves does not count it twice
        first: dict[int, int] = {}
        for i, t in enumerate(leaves):
            first.setdefault(id(t), i)
        grad_leaves = [i for i, t in enumerate(leaves) if t.requires_grad and first[id(t)] == i]
        if not grad_leaves:
            return False
        b = self.captured.batch_size
        for i in grad_leaves:
            t = leaves[i]
            if t.dim() == 0:
                if where == "model":
                    raise RecordingError(
                        "the model returned a scalar (0-dim) output, e.g. a loss computed inside "
                        "forward; cotangents must be recorded per sample. Pass output='name' "
                        "naming the submodule whose output is the per-sample model output."
                    )
                raise RecordingError(
                    f"the {where} output is a scalar; it must have dim 0 = batch size {b}"
                )
            if t.shape[0] != b:
                raise RecordingError(
                    f"the {where} output has shape {tuple(t.shape)} but the batch size of the "
                    f"inputs is {b}; dim 0 of every output tensor must index the batch."
                )
            try:
                codec.dtype_name(t.dtype)
            except TraceCorruptError as e:
                raise RecordingError(f"the {where} output: {e}") from None
        self.captured.output = tree
        self._acc = [None] * len(leaves)
        self._outs = [None] * len(leaves)
        if self.keep_outputs:
            for i in grad_leaves:
                t = leaves[i].detach()  # shares the version counter: in-place use is seen
                self._outs[i] = (t, t._version)
        for i in grad_leaves:
            self._handles.append(leaves[i].register_hook(self._hook(i)))
        self.attached = True
        return True

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def on_grad(grad: torch.Tensor) -> None:
            if not self._live:
                return None
            if self._on_backward is not None:
                self._on_backward()
            g = grad.detach()
            prev = self._acc[i]
            scale = self._scale_fn()
            if scale is not None:
                # divide in at least fp32 (the scale may not fit fp16), keep the output's dtype
                self._scale = scale
                wide = torch.promote_types(g.dtype, torch.float32)
                g = (g.to(wide) / scale.to(device=g.device, dtype=wide)).to(g.dtype)
            elif prev is None:
                g = g.clone()  # autograd may reuse the buffer it handed us
            self._acc[i] = g if prev is None else prev + g
            self.received = True
            self.task = graph_task()
            return None

        return on_grad

    def release(self) -> None:
        """Stop listening for gradients."""
        self._live = False
        if not self.received:
            self._outs = []
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def finish(self) -> CapturedForward:
        """Hand the accumulated cotangents to the captured record (on CPU).

        The accumulators are this capture's own tensors (a clone, a quotient or a sum made
        in ``on_grad``, never touched again once released), so CPU ones need no copy.
        """
        self.release()
        cf = self.captured
        cf.cotangents = [
            None if a is None else a if a.device.type == "cpu" else cpu_copy(a) for a in self._acc
        ]
        cf.grad_scale = 1.0 if self._scale is None else float(self._scale.item())
        if self.keep_outputs:
            cf.outputs = [
                None
                if o is None or a is None or o[0]._version != o[1]
                else o[0]
                if o[0].device.type == "cpu"
                else cpu_copy(o[0])
                for o, a in zip(self._outs, self._acc)
            ]
        self._outs = []
        return cf


class GradTracker:
    """Remembers each parameter's ``.grad`` after its last accumulation.

    ``cleared()`` tells whether the gradients of the last backward have been discarded
    since (set to None, replaced, or zeroed in place) without an optimizer step.
    With ``allow_replaced`` (DDP, whose ``gradient_as_bucket_view`` swaps ``.grad`` for a
    view of its bucket after the all-reduce) a replaced gradient counts as cleared only
    when it is all zeros.
    """

    def __init__(
        self, named_params: dict[str, torch.nn.Parameter], *, allow_replaced: bool = False
    ) -> None:
        self.params = named_params
        self.allow_replaced = allow_replaced
        self.seen: dict[str, tuple[weakref.ref, int]] = {}
        #: the backward pass that found gradients of an earlier backward discarded (zero_grad
        #: between a forward and its backward, e.g. Lightning's order after a skipped step)
        self.cleared_in_task: int | None = None
        self.handles = [
            p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in named_params.items()
        ]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        seen = self.seen

        def on_accumulated(p: torch.Tensor) -> None:
            g = p.grad
            if g is None:
                return
            old = seen.get(name)
            if old is not None and not self.allow_replaced:
                # the gradient of this param's last backward was freed (zero_grad with
                # set_to_none) before this backward accumulated a new one. Not a clear: an
                # out-of-place accumulation, whose old tensor someone still holds (alive).
                # zero_grad(set_to_none=False) between a forward and its backward is not
                # detected here (it is at the next forward and at step()).
                if old[0]() is None:
                    self.cleared_in_task = graph_task()
            seen[name] = (weakref.ref(g), g._version)

        return on_accumulated

    def cleared(self) -> bool:
        changed = []
        for name, (ref, version) in self.seen.items():
            g = self.params[name].grad
            if g is None or (ref() is not g and not self.allow_replaced):
                return True
            if ref() is not g or g._version != version:
                changed.append(g)
        return bool(changed) and not any(bool(g.any()) for g in changed)

    def reset(self) -> None:
        self.seen.clear()
        self.cleared_in_task = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def prune_pending(pending: list[OutputCapture], limit: int) -> tuple[list[OutputCapture], bool]:
    """``pending`` without its oldest forwards still waiting for a backward beyond ``limit``
    (released); and whether any was dropped."""
    waiting = [c for c in pending if not c.received]
    excess = len(waiting) - limit
    if excess <= 0:
        return pending, False
    drop = {id(c) for c in waiting[:excess]}
    for c in waiting[:excess]:
        c.release()
    return [c for c in pending if id(c) not in drop], True
