"""Output buffers of the test side's row passes, reused from one pass to the next.

The per-row Jacobians a pass writes ({name: [R, *shape]}, R × P numbers in all) are the largest
tensors of a step. Allocated afresh, memory of that size comes straight from the operating
system, and the first write to every page faults: on the p = 97 Transformer that doubled the
cost of the products that write J. A `Workspace` lends buffers instead and takes back, at the
next `release()`, those nobody holds any more (no tensor left on their storage), so the next
pass writes into memory that is already mapped. A buffer still held — a caller kept an earlier
result — is never lent again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: buffers under this many bytes come from the allocator as usual (its own caches serve them)
MIN_BYTES = 1 << 20


def _holders(t: Tensor) -> int | None:
    """Tensors on `t`'s storage (the workspace's own included), None where torch cannot say."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata)) - 1
    except (AttributeError, RuntimeError):  # pragma: no cover - another torch
        return None


class Workspace:
    """Flat buffers lent by `empty` and taken back by `release`."""

    def __init__(self) -> None:
        self._free: list[Tensor] = []
        self._lent: list[Tensor] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of `shape`: a free buffer's front where one fits (the
        smallest that does, at most twice the size), else a new one."""
        n = math.prod(shape)
        if n * torch.empty((), dtype=dtype).element_size() < MIN_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        fits = [
            i
            for i, b in enumerate(self._free)
            if b.dtype == dtype and b.device == device and n <= b.numel() <= 2 * n
        ]
        if fits:  # (by place: `==` on tensors compares their elements)
            flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            flat = torch.empty(n, dtype=dtype, device=device)
        self._lent.append(flat)
        return flat[:n].view(shape)

    def release(self) -> None:
        """Take back every lent buffer no tensor holds any more; forget the others, and the
        free buffers nobody took since the last release (so the workspace holds at most what
        one pass lends)."""
        self._free = [b for b in self._lent if _holders(b) == 1]
        self._lent = []

    def reclaim(self) -> None:
        """Within a step: take back the lent buffers nobody holds any more, and keep lending
        the others (a `release` then still finds those)."""
        keep = []
        for b in self._lent:
            (self._free if _holders(b) == 1 else keep).append(b)
        self._lent = keep

    def clear(self) -> None:
        """Drop every buffer."""
        self._free, self._lent = [], []
