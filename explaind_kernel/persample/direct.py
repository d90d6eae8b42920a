"""Parameters the forward reads directly (a positional table `x + self.pos[:t]`, a class token,
a learned scale), outside any module call a rule could hook.

While the row-capture forward runs, a TorchFunctionMode follows every tensor computed from
such parameters alone (slices, views, casts). Where one meets a tensor that holds the rows in a
broadcasting elementwise op (add, sub, mul, div), it is expanded to one copy per row and tapped,
so the backward leaves the gradient of each row at that copy; the vector-Jacobian product of
the parameter → copy chain (views: linear and row-independent) then gives each row's gradient,
batched over rows. Any other meeting (a matmul, a concatenation) marks the parameter as not
treated here, and the caller takes torch.func for it. At per-row points (kink pieces) the chain
is repeated on Δθ, which is exact for the view-like ops listed in `_LINEAR`; any other op on a
parameter there also hands it back.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

_MIXING = {
    torch.add, torch.sub, torch.mul, torch.div, torch.Tensor.add, torch.Tensor.sub,
    torch.Tensor.mul, torch.Tensor.div, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__truediv__,
}  # fmt: skip
_LINEAR = {
    torch.Tensor.__getitem__, torch.Tensor.view, torch.Tensor.reshape, torch.reshape,
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze,
    torch.Tensor.expand, torch.Tensor.transpose, torch.transpose, torch.Tensor.permute,
    torch.permute, torch.Tensor.flatten, torch.flatten, torch.Tensor.narrow, torch.narrow,
    torch.Tensor.select, torch.select, torch.Tensor.contiguous, torch.Tensor.to,
    torch.Tensor.clone, torch.Tensor.T.__get__, torch.Tensor.mT.__get__,
}  # fmt: skip


class DirectReads(TorchFunctionMode):
    """Follows the parameters `leaves` ({canonical name: leaf}) through one forward."""

    def __init__(
        self, leaves: dict[str, Tensor], rows: int, tap, deltas=None, s=None, more=()
    ) -> None:
        super().__init__()
        self.rows, self.tap = rows, tap
        self.leaves = leaves
        # every leaf of a name: `more` holds the leaves of further forwards (other points)
        self.all_leaves: dict[str, list[Tensor]] = {n: [leaf] for n, leaf in leaves.items()}
        for extra in more:
            for n, leaf in extra.items():
                self.all_leaves[n].append(leaf)
        self.derived: dict[int, tuple[Tensor, frozenset[str], Tensor | None]] = {}
        for n, group in self.all_leaves.items():
            twin = deltas.get(n) if deltas is not None else None
            for leaf in group:
                self.derived[id(leaf)] = (leaf, frozenset([n]), twin)
        self.s = s  # [R] per-row points, with `deltas` ({name: Δθ})
        self.taps: list[tuple[Tensor, frozenset[str], list]] = []
        self.failed: set[str] = set()

    def _touches(self, args, kwargs) -> bool:
        """Whether a followed tensor is among the arguments (one level of lists looked into)."""
        derived = self.derived
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                if id(a) in derived:
                    return True
            elif isinstance(a, (list, tuple)):
                if any(isinstance(b, Tensor) and id(b) in derived for b in a):
                    return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._touches(args, kwargs):
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        hits = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and id(t) in self.derived]
        if not hits:
            return func(*args, **kwargs)
        names = frozenset().union(*(self.derived[id(flat[i])][1] for i in hits))
        rowed = [
            t
            for i, t in enumerate(flat)
            if isinstance(t, Tensor) and i not in hits and t.dim() > 0 and t.shape[0] == self.rows
        ]
        if not rowed:
            return self._follow(func, flat, spec, hits, names)
        if func not in _MIXING:
            self.failed.update(names)
            return func(*args, **kwargs)
        width = max(t.dim() for t in rowed)
        for i in hits:
            d, _, twin = self.derived[id(flat[i])]
            if d.dim() > width or (d.dim() == width and d.shape[0] != 1):
                self.failed.update(names)
                return func(*args, **kwargs)
            shape = (1,) * (width - d.dim()) + tuple(d.shape)
            e = d.reshape(shape).expand(self.rows, *shape[1:])
            if self.s is not None:
                if twin is None:
                    self.failed.update(names)
                    return func(*args, **kwargs)
                s = self.s.reshape(-1, *([1] * (width - 1))).to(e.dtype)
                e = e + s * twin.reshape(shape)
            slot: list = []
            flat[i] = self.tap(e, slot)
            self.taps.append((d, names, slot))
        a, kw = tree_unflatten(flat, spec)
        return func(*a, **kw)

    def _follow(self, func, flat, spec, hits, names):
        """An op on the parameters alone: its output is followed too (with its Δθ twin when
        the op is linear)."""
        a, kw = tree_unflatten(flat, spec)
        out = func(*a, **kw)
        twin = None
        if self.s is not None and func in _LINEAR:
            tflat = list(flat)
            ok = True
            for i in hits:
                tw = self.derived[id(flat[i])][2]
                ok = ok and tw is not None
                tflat[i] = tw
            if ok:
                ta, tkw = tree_unflatten(tflat, spec)
                twin = func(*ta, **tkw)
        for o in tree_flatten(out)[0]:
            if isinstance(o, Tensor):
                self.derived[id(o)] = (o, names, twin if isinstance(twin, Tensor) else None)
        return out

    def gradients(self) -> dict[str, Tensor]:
        """{name: [R, *shape]} per-row gradients of the followed parameters (after backward)."""
        out: dict[str, Tensor] = {}
        for d, names, slot in self.taps:
            if not slot:
                continue  # this read never reached the explained values
            g = slot[0].reshape(self.rows, *d.shape)
            order = sorted(names)
            if len(order) == 1 and any(d is leaf for leaf in self.all_leaves[order[0]]):
                got, of = [g], order
            else:
                of = [n for n in order for _ in self.all_leaves[n]]
                got = torch.autograd.grad(
                    d,
                    [leaf for n in order for leaf in self.all_leaves[n]],
                    g,
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            for n, gn in zip(of, got):
                if gn is not None:
                    out[n] = out[n] + gn if n in out else gn
        return out
