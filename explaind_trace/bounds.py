"""What the trace header allows a record to hold, checked before anything is allocated.

The header (``meta``) fixes the name, shape and dtype of every parameter and buffer and
the hyperparameters of every param group. ``HeaderBounds`` decodes the tensors of a record
against it: a gradient, parameter or optimizer-state tensor must have its parameter's shape
(or at most its size), a buffer its buffer's shape, an RNG state at most 1 MiB of bytes;
tensors the header says nothing about (input rows, cotangents, constant inputs) at most
``free_bytes`` (a cotangent stored by the cotangent codec: its declared shape and each of
its fields, see ``cotangent_codec.EncodedCotangent``). A record that declares anything else
is damaged: ``TraceCorruptError`` naming the trace, the record key and the field, before its
data is decompressed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import codec
from .errors import TraceCorruptError
from .records import TraceMeta

__all__ = ["HeaderBounds"]

_RNG_BYTES = 1 << 20
_FREE_FLOOR = 1 << 30  # 1 GiB: a tensor the header does not fix may take at least this
_NUMBERS = (int, float)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = codec.DTYPES[dtype].itemsize if dtype in codec.DTYPES else 8
    for s in shape:
        n *= s
    return n


class HeaderBounds:
    """Decoders of record fields, bounded by the trace header ``meta``."""

    def __init__(self, meta: TraceMeta) -> None:
        self.params = {p.name: (tuple(p.shape), p.dtype) for p in meta.params}
        self.buffers = {b.name: (tuple(b.shape), b.dtype) for b in meta.buffers}
        self.groups = [g.hyperparams for g in meta.optimizer.groups]
        total = sum(_nbytes(s, d) for s, d in [*self.params.values(), *self.buffers.values()])
        #: bound on a tensor whose shape the header does not fix
        self.free_bytes = max(_FREE_FLOOR, 64 * total)

    def _map(self, d: Any, where: str) -> dict[str, Any]:
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise TraceCorruptError(f"{where}: expected a map of named tensors")
        return d

    def grads(self, d: Any, where: str) -> dict[str, torch.Tensor]:
        """Gradients (or parameters): each named by the header, of its shape and dtype; or
        packed (``encoder.TensorEncoder.gradients``): the header's parameters at the listed
        positions, one flat tensor of their sizes and shared dtype."""
        if isinstance(d, dict) and d.get("packed") == 1:
            return self._packed_grads(d, where)
        out = {}
        for name, obj in self._map(d, where).items():
            spec = self.params.get(name)
            if spec is None:
                raise TraceCorruptError(
                    f"{where}: tensor {name!r:.80} is not a parameter of the trace header"
                )
            out[name] = codec.decode_tensor(
                obj, where=f"{where}, {name!r}", shape=spec[0], dtype=spec[1]
            )
        return out

    params_map = grads

    def _packed_grads(self, d: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        names = list(self.params)
        of = d.get("of")
        if (
            not isinstance(of, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in of)
            or len(set(of)) != len(of)
            or not all(0 <= i < len(names) for i in of)
            or len({self.params[names[i]][1] for i in of}) > 1
        ):
            raise TraceCorruptError(f"{where}: the packed gradients' parameter list is malformed")
        specs = [self.params[names[i]] for i in of]
        sizes = [math.prod(shape) for shape, _ in specs]
        flat = codec.decode_tensor(
            d.get("data"),
            where=f"{where}, packed",
            shape=(sum(sizes),),
            dtype=specs[0][1] if specs else None,
        )
        parts = torch.split(flat, sizes) if specs else []
        return {names[i]: p.view(s) for i, p, (s, _) in zip(of, parts, specs)}

    def buffer_map(self, d: Any, where: str) -> dict[str, torch.Tensor]:
        """Buffers: those the header names have its shape and dtype; others are bounded."""
        out = {}
        for name, obj in self._map(d, where).items():
            spec = self.buffers.get(name)
            at = f"{where}, buffer {name!r:.80}"
            if spec is None:
                out[name] = codec.decode_tensor(obj, where=at, max_bytes=self.free_bytes)
            else:
                out[name] = codec.decode_tensor(obj, where=at, shape=spec[0], dtype=spec[1])
        return out

    def state_tensor(self, param: str, key: str, obj: Any, where: str) -> torch.Tensor:
        """An optimizer-state tensor of ``param``: at most twice its parameter's bytes."""
        spec = self.params.get(param)
        if spec is None:
            raise TraceCorruptError(
                f"{where}: optimizer state of {param!r:.80}, which is not a parameter of the "
                "trace header"
            )
        limit = max(2 * _nbytes(*spec), 1024)
        return codec.decode_tensor(
            obj, where=f"{where}, state {param!r}/{key!r:.40}", max_bytes=limit
        )

    def rng(self, obj: Any, where: str) -> torch.Tensor:
        """An RNG state: uint8, at most 1 MiB."""
        return codec.decode_tensor(obj, where=where, dtype="uint8", max_bytes=_RNG_BYTES)

    def free(self, obj: Any, where: str, shape: Any = None, dtype: Any = None) -> torch.Tensor:
        """A tensor the header does not fix (input rows, cotangents): bounded by size."""
        return codec.decode_tensor(
            obj, where=where, shape=shape, dtype=dtype, max_bytes=self.free_bytes
        )

    def groups_of(self, groups: Any, tkeys: Any, where: str) -> tuple[list, list]:
        """A step's per-group hyperparameters: one map per header group, each value of the
        kind (number, bool, list of the same length, string, None) the header recorded."""
        if not isinstance(groups, list) or len(groups) != len(self.groups):
            raise TraceCorruptError(
                f"{where}: holds {len(groups) if isinstance(groups, list) else 'no'} param "
                f"group(s), the trace header {len(self.groups)}"
            )
        tkeys = tkeys or []
        if not isinstance(tkeys, list) or not all(
            isinstance(t, dict) and all(v in codec.DTYPES for v in t.values()) for t in tkeys
        ):
            raise TraceCorruptError(f"{where}: its tensor-hyperparameter dtypes are malformed")
        for gi, (got, header) in enumerate(zip(groups, self.groups)):
            if not isinstance(got, dict):
                raise TraceCorruptError(f"{where}: param group {gi} is not a map")
            for key, value in got.items():
                if key in header and not _same_kind(value, header[key]):
                    raise TraceCorruptError(
                        f"{where}: hyperparameter {key!r} of group {gi} is {value!r:.60}, "
                        f"not of the kind the trace header recorded ({header[key]!r:.60})"
                    )
        return groups, tkeys


def _same_kind(value: Any, recorded: Any) -> bool:
    if recorded is None or value is None:
        return True
    if isinstance(recorded, bool) or isinstance(value, bool):
        return isinstance(recorded, bool) and isinstance(value, bool)
    if isinstance(recorded, _NUMBERS):
        return isinstance(value, _NUMBERS)
    if isinstance(recorded, list):
        return (
            isinstance(value, list)
            and len(value) == len(recorded)
            and all(_same_kind(v, r) for v, r in zip(value, recorded))
        )
    return type(value) is type(recorded)
