"""Input and output structures of a forward, as small stored trees (encode and decode).

Every node is a map with a ``k`` field:

- ``b``: the i-th batched input slot (``i``), rebuilt from the per-sample rows;
- ``t``: the i-th tensor (``i``) of the record's ``tensors`` (inputs) or ``cotangents``
  (outputs) list;
- ``v``: a plain value (``v``: bool, int, float or str); ``n``: None;
- ``tuple``/``list``: ``items``; ``dict``: ``keys`` (strings) and ``items``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import codec
from .errors import RecordingError, TraceCorruptError
from .packing import cpu_copy

__all__ = ["capture_inputs", "output_tree", "build_tree"]


def capture_inputs(
    args: tuple, kwargs: dict[str, Any], batch_size: int
) -> tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]:
    """Trees for args/kwargs plus CPU copies of batched (``slots``) and constant tensors."""
    slots: list[torch.Tensor] = []
    consts: list[torch.Tensor] = []

    def node(obj: Any, where: str) -> Any:
        if isinstance(obj, torch.Tensor):
            try:
                codec.dtype_name(obj.dtype)
            except TraceCorruptError as e:
                raise RecordingError(f"model input {where}: {e}") from None
            if obj.layout != torch.strided:
                raise RecordingError(
                    f"model input {where} is a {obj.layout} tensor; only dense tensors are recorded"
                )
            if obj.dim() >= 1 and obj.shape[0] == batch_size:
                slots.append(cpu_copy(obj))
                return {"k": "b", "i": len(slots) - 1}
            consts.append(cpu_copy(obj))
            return {"k": "t", "i": len(consts) - 1}
        if obj is None:
            return {"k": "n"}
        if isinstance(obj, bool | int | float | str):
            if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
                raise RecordingError(f"model input {where} = {obj} does not fit in 64 bits")
            return {"k": "v", "v": obj}
        if isinstance(obj, tuple | list):
            kind = "tuple" if isinstance(obj, tuple) else "list"
            return {"k": kind, "items": [node(o, f"{where}[{i}]") for i, o in enumerate(obj)]}
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise RecordingError(f"model input {where} is a dict with non-string keys")
            return {
                "k": "dict",
                "keys": list(obj),
                "items": [node(v, f"{where}[{k!r}]") for k, v in obj.items()],
            }
        raise RecordingError(
            f"model input {where} has type {type(obj).__name__}, which cannot be recorded. "
            "Model inputs must be tensors, numbers, strings, None, or tuples/lists/dicts of these."
        )

    args_tree = node(tuple(args), "args")
    kwargs_tree = node(dict(kwargs), "kwargs")
    return args_tree, kwargs_tree, slots, consts


def output_tree(output: Any) -> tuple[Any, list[torch.Tensor]]:
    """The tree of a model output and its tensor leaves (leaf i is ``{"k": "t", "i": i}``;
    anything that is not a tensor or a container of tensors is stored as ``n``)."""
    leaves: list[torch.Tensor] = []

    def node(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            leaves.append(obj)
            return {"k": "t", "i": len(leaves) - 1}
        if isinstance(obj, tuple | list):
            kind = "tuple" if isinstance(obj, tuple) else "list"
            return {"k": kind, "items": [node(o) for o in obj]}
        if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
            return {"k": "dict", "keys": list(obj), "items": [node(v) for v in obj.values()]}
        return {"k": "n"}

    return node(output), leaves


def build_tree(node: Any, slots: list[torch.Tensor], tensors: list[Any]) -> Any:
    """Rebuild a stored structure; ``slots``/``tensors`` fill its leaves."""
    if not isinstance(node, dict) or "k" not in node:
        raise TraceCorruptError(f"malformed structure node {node!r:.80}")
    kind = node["k"]
    try:
        if kind == "b":
            return slots[node["i"]]
        if kind == "t":
            return tensors[node["i"]]
        if kind == "v":
            return node["v"]
        if kind == "n":
            return None
        if kind == "tuple":
            return tuple(build_tree(n, slots, tensors) for n in node["items"])
        if kind == "list":
            return [build_tree(n, slots, tensors) for n in node["items"]]
        if kind == "dict":
            return {k: build_tree(n, slots, tensors) for k, n in zip(node["keys"], node["items"])}
    except (IndexError, KeyError, TypeError) as e:
        raise TraceCorruptError(f"malformed structure node of kind {kind!r} ({e!r})") from e
    raise TraceCorruptError(f"unknown structure node kind {kind!r}")
