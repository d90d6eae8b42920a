"""Test inputs and their labels in the forms users hold them, turned into tensors.

`collect_inputs(inputs, labels, positional=k)` accepts

* a tensor [N, ...], a numpy array, a tuple of tensors (positional inputs) or a dict of
  tensors (keyword inputs) — as before;
* an ``(x, y)`` tuple: inputs and labels, when the traced model takes one positional input
  (``positional == 1``; a model of two positional inputs takes the pair as its inputs);
* a ``torch.utils.data.Dataset`` yielding ``x`` or ``(x, y, ...)``, or a ``DataLoader``
  yielding such batches: rows are stacked, the second item becomes the labels, anything
  after it (a sample index, say) is ignored.

`labels=` always wins over labels that come with the inputs. Numbers in labels keep their
dtype (class indices stay integers). `split_inputs` and `check_against_trace` then check the
tensors' batch dimension and that they are passed like the recorded training inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "check_against_trace",
    "collect_inputs",
    "inputs_digest",
    "positional_inputs",
    "problem_digest",
    "split_inputs",
]


def _tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InputError(f"{what} must be a numeric array, got dtype {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float)):
        return torch.as_tensor(value)
    raise InputError(f"{what} must be a tensor or a numpy array, got {type(value).__name__}")


def _is_loader(value: Any) -> bool:
    return isinstance(value, torch.utils.data.DataLoader)


def _is_dataset(value: Any) -> bool:
    return isinstance(value, torch.utils.data.Dataset) and not isinstance(value, Tensor)


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)):
        if not item:
            raise InputError("a test Dataset/DataLoader yielded an empty item")
        return item[0], item[1] if len(item) > 1 else None
    return item, None


def _stack(parts: list[Any], what: str, *, batched: bool) -> Tensor:
    tensors = [_tensor(p, what) for p in parts]
    try:
        return torch.cat(tensors) if batched else torch.stack(tensors)
    except RuntimeError as e:
        raise InputError(f"the {what} do not share one shape ({e}); give rows of one shape") from e


def _from_iterable(source: Any) -> tuple[Tensor, Tensor | None]:
    """Rows and labels of a Dataset (items) or a DataLoader (batches)."""
    batched = _is_loader(source)
    xs, ys = [], []
    for item in source:
        x, y = _split_item(item)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise InputError("the test Dataset/DataLoader yielded no rows")
    have = [y is not None for y in ys]
    if any(have) and not all(have):
        raise InputError("some items of the test Dataset carry labels and others do not")
    x = _stack(xs, "test inputs", batched=batched)
    y = _stack(ys, "test labels", batched=batched) if all(have) else None
    return x, y


def positional_inputs(reader: Any) -> int | None:
    """Positional tensor inputs of the trace's first recorded forward (None: none recorded)."""
    fwds = reader.step(0).forwards
    if not fwds:
        return None
    return sum(isinstance(a, Tensor) for a in fwds[0].args)


def collect_inputs(
    inputs: Any, labels: Any = None, *, positional: int | None = None
) -> tuple[Tensor | tuple[Tensor, ...] | dict[str, Tensor], Any]:
    """(inputs as tensors, labels) from any of the forms above; see the module docstring.

    positional: the number of positional tensor inputs the traced model takes (None when
    the trace does not say); a 2-tuple is read as (inputs, labels) only when it is 1.
    """
    if _is_loader(inputs) or _is_dataset(inputs):
        x, y = _from_iterable(inputs)
        return x, labels if labels is not None else y
    if isinstance(inputs, Mapping):
        return {k: _tensor(v, f"test input {k!r}") for k, v in inputs.items()}, labels
    if isinstance(inputs, (tuple, list)):
        parts = list(inputs)
        if len(parts) == 2 and positional == 1:
            return _tensor(parts[0], "test inputs"), labels if labels is not None else parts[1]
        return tuple(_tensor(p, f"test input {j}") for j, p in enumerate(parts)), labels
    return _tensor(inputs, "test inputs"), labels


def _feed(h: Any, value: Any) -> None:
    """Hash a tree of tensors, arrays, numbers and strings by type, shape and bytes."""
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(value)))
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in value:
            _feed(h, str(k))
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (tuple, list)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif callable(value):
        code = getattr(value, "__code__", None)
        name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
        h.update(f"F{name}".encode())
        if code is not None:
            h.update(code.co_code)
            h.update(repr((code.co_consts, code.co_names)).encode())
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def inputs_digest(
    inputs: Any,
    labels: Any,
    outputs: Any,
    *,
    output_names: Any = None,
    slices: Any = None,
) -> str:
    """A 24-hex blake2b of the test inputs and the targets (outputs, labels, output names,
    slices): two kernel results answer the same question iff trace, config and this agree.
    A callable target counts by its module, name and bytecode."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for part in (inputs, labels, outputs, output_names, slices):
        _feed(h, part)
        h.update(b"|")
    return h.hexdigest()


def problem_digest(
    reader: Any,
    inputs: Any,
    *,
    outputs: Any = "all",
    labels: Any = None,
    output_names: Any = None,
    slices: Any = None,
) -> str:
    """The `inputs_digest` a kernel result of these test inputs and targets on the trace of
    `reader` records (``result.extra["inputs_digest"]``), without computing anything."""
    inputs, labels = collect_inputs(inputs, labels, positional=positional_inputs(reader))
    return inputs_digest(inputs, labels, outputs, output_names=output_names, slices=slices)


def split_inputs(inputs: Any) -> tuple[tuple[str | None, ...], tuple[Tensor, ...]]:
    """(keys, tensors) of test inputs given as a tensor, a tuple or a dict (keys None for
    positional inputs), checked to share a non-empty leading batch dimension."""
    if isinstance(inputs, Mapping):
        keys: tuple[str | None, ...] = tuple(str(k) for k in inputs)
        xs = tuple(inputs.values())
    else:
        xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        keys = (None,) * len(xs)
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
    return keys, xs


def check_against_trace(reader: Any, keys: tuple[str | None, ...], xs: tuple[Tensor, ...]) -> None:
    """The test inputs must be passed like the first recorded training forward's inputs."""
    fwds = reader.step(0).forwards
    if not fwds:  # a trace without forwards has nothing to compare with
        return
    f = fwds[0]
    trained = [(None, a) for a in f.args if isinstance(a, Tensor)]
    trained += [(k, v) for k, v in f.kwargs.items() if isinstance(v, Tensor) and v.dim() > 0]
    positional = [a for k, a in trained if k is None]
    named = {k: a for k, a in trained if k is not None}
    given_pos = [k for k in keys if k is None]
    unknown = [k for k in keys if k is not None and k not in named]
    if len(positional) != len(given_pos) or unknown:
        raise InputError(
            f"the model was trained with {len(positional)} positional tensor input(s) and "
            f"keyword tensors {sorted(named)} per forward, but the test inputs are "
            f"{len(given_pos)} positional and keywords {sorted(k for k in keys if k)}; "
            "pass positional inputs as a tensor or tuple in the same order, and keyword inputs "
            "as a dict (e.g. {'input_ids': ...})."
        )
    it = iter(positional)
    pairs = [(k, named[k] if k is not None else next(it)) for k in keys]
    for (k, a), x in zip(pairs, xs):
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
