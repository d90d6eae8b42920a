"""Copy many small CPU tensors with one copy per dtype instead of one copy each.

At an optimizer step the recorder copies every gradient and, when they changed, every
buffer: many small tensors, where each copy's allocation and dispatch cost more than its
bytes. ``copy_named`` concatenates same-dtype CPU tensors into one flat tensor on the
training thread; ``PackedTensors`` reads back as the mapping of name to tensor (views of
the flat copies, made when first read) and hands the writer each tensor's bytes directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors

from . import codec

__all__ = ["PackedTensors", "copy_named", "cpu_copy"]


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` with its strides (``clone`` on CPU: the same copy, less overhead)."""
    t = t.detach()
    return t.clone() if t.device.type == "cpu" else t.to("cpu", copy=True)


class PackedTensors(Mapping[str, torch.Tensor]):
    """Name -> CPU tensor, stored as flat per-dtype copies; a read gives a contiguous view.

    Read-only, and read by one thread (the trace writer's) once handed over.
    """

    def __init__(
        self, flats: list[torch.Tensor], layout: dict[str, tuple[int, int, torch.Size]]
    ) -> None:
        self._flats = flats
        self._layout = layout  # name -> (flat index, offset, shape), in the original order
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views.get(name)
        if view is None:
            i, offset, shape = self._layout[name]
            view = self._flats[i][offset : offset + shape.numel()].view(shape)
            self._views[name] = view
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def byte_items(self) -> Iterator[tuple[str, torch.dtype, torch.Size, np.ndarray]]:
        """``(name, dtype, shape, row-major little-endian bytes)`` per tensor, without views."""
        flats = [(f.dtype, f.element_size(), codec.tensor_u8(f)) for f in self._flats]
        for name, (i, offset, shape) in self._layout.items():
            dtype, size, u8 = flats[i]
            start = offset * size
            yield name, dtype, shape, u8[start : start + shape.numel() * size]

    def __len__(self) -> int:
        return len(self._layout)

    def flat(self) -> torch.Tensor | None:
        """The one flat copy, when all tensors share a dtype and fill it in their order."""
        if len(self._flats) != 1:
            return None
        offset = 0
        for _, start, shape in self._layout.values():
            if start != offset:
                return None
            offset += shape.numel()
        return self._flats[0] if offset == self._flats[0].numel() else None

    def numel(self) -> int:
        """Elements of all tensors together (without making views)."""
        return sum(f.numel() for f in self._flats)


def copy_named(named: list[tuple[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    """CPU copies of the named tensors (same values, row-major): one copy per dtype when all
    are dense CPU tensors, else one ``cpu_copy`` each (a device tensor is never concatenated
    on the device, which would need as much device memory again)."""
    if not all(t.is_cpu and t.layout is torch.strided for _, t in named):
        return {n: cpu_copy(t) for n, t in named}
    plan = _plan(named)
    with torch.no_grad():
        # one C++ call per dtype (contiguous row-major, concatenated into new memory); it
        # returns a view of a lone tensor, which needs its own copy
        flats = [
            _flatten_dense_tensors([named[j][1] for j in idx])
            if len(idx) > 1
            else named[idx[0]][1].reshape(-1).clone()
            for idx in plan.groups
        ]
    return PackedTensors(flats, plan.layout)


class _Plan:
    """Which flat copy each named tensor goes to, and where (see ``_plan``)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        index: dict[torch.dtype, int] = {}  # flat tensor i: the i-th dtype seen
        self.groups: list[list[int]] = []
        sizes: list[int] = []
        self.layout: dict[str, tuple[int, int, torch.Size]] = {}
        for j, (name, t) in enumerate(named):
            i = index.setdefault(t.dtype, len(index))
            if i == len(sizes):
                self.groups.append([])
                sizes.append(0)
            self.groups[i].append(j)
            self.layout[name] = (i, sizes[i], t.shape)
            sizes[i] += t.numel()


_plans: dict[tuple[tuple[str, torch.dtype, torch.Size], ...], _Plan] = {}


def _plan(named: list[tuple[str, torch.Tensor]]) -> _Plan:
    """The packing plan of these names, dtypes and shapes; the same every step of a run
    (gradients keep their parameter's dtype and shape), so it is made once and kept."""
    key = tuple((n, t.dtype, t.shape) for n, t in named)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 64:
            _plans.clear()
        plan = _plans[key] = _Plan(named)
    return plan
