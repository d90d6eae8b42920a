"""Row capture: hooks on the private model copy that record, per module call, the inputs and
(through an identity "tap" on the outputs) the gradient of the explained sum at the outputs.

One forward over all rows and one backward of the *sum* of the explained values then give every
module the output gradient of each row — exact as long as rows do not interact (eval mode; a
training forward without batch statistics), which the callers check per row. The layer rules
turn (inputs, output gradients) into per-row parameter gradients. With `shift` set, each row r
is evaluated at its own point θ + s_r·Δθ: a module whose output is affine in its parameters
adds s_r times its output's derivative along its Δθ (one more layer evaluation).

The hooks live on FunctionalModel's private copy only, do nothing outside `capture()`, and are
removed by `close()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .direct import DirectReads
from .fold import _folded, _merged, _summed
from .local import batch_dim, local_rule
from .registry import (
    Call,
    layer_folds,
    layer_rule_for,
    layer_shift_for,
    replace_leaves,
    tensor_leaves,
)
from .seeds import base_rule, seeded_backward
from .workspace import Workspace


def _has_rows(t: Tensor, rows: int, bdim: int = 0) -> bool:
    return t.dim() > bdim and t.shape[bdim] == rows


def _per_row(t: Tensor, rows: int) -> Tensor:
    """`t`, shared by every row, seen as one copy per row: a leading dim of 1 (a broadcast
    batch dim, like Hugging Face position ids [1, L]) is expanded in place, any other shape
    gets a new leading dim."""
    if t.dim() > 0 and t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:])
    return t.expand(rows, *t.shape)


class _Tap(torch.autograd.Function):
    """Identity whose backward keeps the gradient arriving at a module output."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, slot: list) -> Tensor:  # type: ignore[override]
        ctx.slot = slot
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        ctx.slot.append(g)
        return g, torch.zeros((), dtype=g.dtype, device=g.device), None


@dataclass
class _Owner:
    """A hooked module: its direct parameters as {local name: canonical name}."""

    path: str
    own: dict[str, str]
    calls: list[Call]
    untapped: bool = False


@dataclass
class Shift:
    """Per-row evaluation points θ + s_r·Δθ: `s` [R] and Δθ by canonical parameter name."""

    s: Tensor
    delta: Mapping[str, Tensor]


class RowCapture:
    """Per-row gradients of the parameters `names` of `module` (FunctionalModel.module)."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        canonical = {id(p): n for n, p in module.named_parameters()}
        wanted = set(names)
        self._owners: dict[int, _Owner] = {}
        self._handles = []
        self._active = False
        self._anchor: Tensor | None = None
        self._rows = 0
        self._shift: Shift | None = None
        self.shiftable = True  # every hooked module has a shift (per-row points possible)
        self.direct: dict[str, str] = {}  # the root's own parameters, {local: canonical}
        self._reads: DirectReads | None = None
        self._shift_used = False
        self._seeded = False  # this capture's backward is seeded (seeds.py)
        self.seeded = True  # seeded passes work on this model (False after one failed)
        self._seed_layout = (1, 1)  # (outputs, groups) of the last seeded backward
        self.workspace = Workspace()  # the large outputs of the base-row rules
        for path, m in module.named_modules():
            own = {
                local: canonical[id(p)]
                for local, p in m.named_parameters(recurse=False, remove_duplicate=False)
                if id(p) in canonical and canonical[id(p)] in wanted
            }
            if not own and m is not module:  # the root is always hooked (orphans go there)
                continue
            if m is module:  # the root's own parameters are read directly (direct.py)
                self.direct = dict(own)
            elif layer_shift_for(m) is None:
                self.shiftable = False
            self._owners[id(m)] = _Owner(path, own, [])
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        self.covered = {c for o in self._owners.values() for c in o.own.values()}
        self._modules = {id(m): m for _, m in module.named_modules()}

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def capture(
        self,
        rows: int,
        params: Mapping[str, Tensor],
        shift: Shift | None = None,
        *,
        seeded: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """Record module calls of one forward over `rows` rows (at per-row points if `shift`);
        yields the parameters to run that forward with (the root's own ones as followed
        leaves). `seeded`: the backward is `backward_seeded`'s."""
        with self.capture_points(rows, [params], shift, seeded=seeded) as runs:
            yield runs[0]

    @contextlib.contextmanager
    def capture_points(
        self,
        rows: int,
        points: list[Mapping[str, Tensor]],
        shift: Shift | None = None,
        *,
        seeded: bool = False,
    ) -> Iterator[list[dict[str, Tensor]]]:
        """`capture` for several forwards over the same rows, one per parameter point, before
        one backward: yields the parameters to run each with. A module's calls are then one
        per forward, and `gradients` sums them (quadrature nodes with their weights on the
        seeds, say)."""
        for o in self._owners.values():
            o.calls.clear()
            o.untapped = False
        ref = next(iter(points[0].values()))
        self._anchor = torch.zeros((), dtype=ref.dtype, device=ref.device, requires_grad=True)
        self._rows, self._shift, self._active = rows, shift, True
        self._shift_used, self._seeded = shift is not None, seeded
        runs = [dict(p) for p in points]
        reads = contextlib.nullcontext()
        self._reads = None
        if self.direct:
            names = [c for c in self.direct.values() if c in points[0]]
            leaves = [{c: p[c].detach().requires_grad_(True) for c in names} for p in points]
            for run, own in zip(runs, leaves):
                run.update(own)
            deltas = None
            if shift is not None:
                deltas = {c: shift.delta[c] for c in names if c in shift.delta}
            self._reads = DirectReads(
                leaves[0],
                rows,
                self._tap,
                deltas,
                None if shift is None else shift.s,
                more=leaves[1:],
            )
            reads = self._reads
        try:
            with torch.enable_grad(), reads:
                yield runs
        finally:
            self._active = False
            self._shift = None

    def discard(self) -> None:
        """Drop what the last capture recorded (a forward used for its per-row points only)."""
        for o in self._owners.values():
            o.calls.clear()
        self._reads = None

    def _tap(self, t: Tensor, slot: list) -> Tensor:
        if self._seeded:  # the tensor whose gradient backward_seeded asks for; a copy goes on,
            raw = t + self._anchor  # so an in-place op downstream leaves it as it was
            slot.append(raw)
            return raw.clone()
        return _Tap.apply(t, self._anchor, slot)

    def backward(self, total: Tensor) -> None:
        """Backpropagate the explained sum `total` to every tapped module output."""
        assert self._anchor is not None, "backward() runs inside capture()"
        keep = self._reads is not None  # direct reads differentiate their view chains after
        torch.autograd.grad(total, [self._anchor], allow_unused=True, retain_graph=keep)

    def backward_seeded(self, outputs: list[Tensor], groups: int = 1) -> None:
        """The backward of a seeded capture (seeds.py): every output [rows, O] seeded with
        each of its O values at once; afterwards the capture holds rows·O rows, row
        (j·O + o)·groups + k for base row j·groups + k and output o, as an expanded pass."""
        assert self._seeded and self._anchor is not None, "a seeded capture's backward"
        calls = [(self._modules[k], c) for k, o in self._owners.items() for c in o.calls]
        taps = [slot for _, _, slot in self._reads.taps] if self._reads is not None else []
        rows = seeded_backward(outputs, calls, taps, self._rows, groups, self._reads is not None)
        self._rows, self._seed_layout = rows, (rows // self._rows, groups)
        if self._reads is not None:
            self._reads.rows = rows

    def _hook(self, module: nn.Module, args, kwargs, output):
        if not self._active:
            return None
        owner = self._owners[id(module)]
        state = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        leaves = tensor_leaves(output)
        rows, bdim = self._rows, batch_dim(module)
        if bdim == 0 and any(t.is_floating_point() and not _has_rows(t, rows) for t in leaves):
            # a call shared by every row (positions, a constant input): seen as one per row,
            # so its output gradient splits by row; a model this misleads fails the check
            leaves = [
                _per_row(t, rows) if t.is_floating_point() and not _has_rows(t, rows) else t
                for t in leaves
            ]
            args = tuple(
                _per_row(a, rows) if isinstance(a, Tensor) and not _has_rows(a, rows) else a
                for a in args
            )
        call = Call(tuple(args), dict(kwargs), state, module.training, list(leaves))
        if self._shift is not None:
            leaves = self._shifted(module, owner, call, leaves)
        slots: list[list] = []
        tapped = []
        for t in leaves:
            slot: list = []
            slots.append(slot)
            if not t.is_floating_point():
                tapped.append(t)
            elif _has_rows(t, rows, bdim):
                tapped.append(self._tap(t, slot))
            else:  # a floating output without the rows: its gradient cannot be split by row
                owner.untapped = True
                tapped.append(t)
        call.grads = slots  # type: ignore[assignment]  (lists until gradients() reads them)
        owner.calls.append(call)
        return replace_leaves(output, tapped)

    def _shifted(self, module, owner: _Owner, call: Call, leaves: list[Tensor]) -> list[Tensor]:
        shift = self._shift
        assert shift is not None
        fn = layer_shift_for(module)
        if fn is None:  # the root: its own parameters are shifted where they are read
            return leaves
        delta = {loc: shift.delta[c] for loc, c in owner.own.items() if c in shift.delta}
        d = fn(module, call, delta) if delta else None
        if d is None:
            return leaves
        s = shift.s.reshape(-1, *([1] * (d.dim() - 1))).to(d.dtype)
        return [torch.addcmul(leaves[0], s, d)] + leaves[1:]

    @torch.no_grad()
    def gradients(self, groups: int = 1, merge: bool = False) -> tuple[dict[str, Tensor], set[str]]:
        """({canonical name: [R/groups, *shape]} per-row gradients, names no rule could
        produce). With `groups` > 1 every row is `groups` consecutive rows, summed (the rules
        are linear in the output gradients, so this sums the gradients of their seeds:
        quadrature nodes weighted through their seeds, say). With `merge`, the calls of a
        module with a folding rule go to it as one call, their tokens side by side (the
        forwards of `capture_points`, say)."""
        if groups < 1 or self._rows % groups:
            raise ValueError(f"{self._rows} rows are not rows of {groups} consecutive groups")
        out: dict[str, Tensor] = {}
        failed: set[str] = set()
        orphans = self._orphans(failed)
        done: set[str] = set()  # the root's own parameters the direct reads treated
        if self._reads is not None:
            reads, self._reads = self._reads, None
            out.update(_summed(reads.gradients(), groups))
            done = set(reads.leaves) - reads.failed
            if self._shift_used:  # no local rule at per-row points
                failed.update(reads.failed)
                done = set(reads.leaves)
        for key, owner in self._owners.items():
            module = self._modules[key]
            rule = layer_rule_for(module)
            if owner.untapped:
                failed.update(owner.own.values())
                failed.update(orphans.get(key, {}).values())
                owner.calls.clear()
                continue
            for call in owner.calls:
                call.grads = [s[0] if s else None for s in call.grads]  # type: ignore[union-attr]
                call.args = tuple(a.detach() if isinstance(a, Tensor) else a for a in call.args)
            calls = owner.calls
            if any(c.seeded for c in calls):  # the calls a seeded pass left at its base rows
                seeded = [c for c in calls if c.seeded]
                got = base_rule(module, seeded, *self._seed_layout, self.workspace.empty)
                calls = [c for c in calls if not c.seeded]
                for local, g in got.items():
                    c = owner.own.get(local)
                    if c is not None and c not in done:
                        out[c] = out[c] + g if c in out else g
            if merge and len(calls) > 1 and rule is not None and layer_folds(module):
                calls = _merged(calls, self._rows)
            for call in calls:
                if all(g is None for g in call.grads):
                    continue  # this call never reached the explained values: zero gradient
                parts = self._call_grads(module, rule, owner, call, orphans.get(key), done, groups)
                for names, got in parts:
                    if got is None:
                        failed.update(names.values())
                        continue
                    for local, g in got.items():
                        c = names.get(local)
                        if c is not None:
                            out[c] = out[c] + g if c in out else g
            owner.calls.clear()
        return out, failed

    def _orphans(self, failed: set[str]) -> dict[int, dict[str, str]]:
        """Parameters of hooked modules that were not called (read by an ancestor's forward,
        like nn.MultiheadAttention's out_proj): {ancestor key: {relative name: canonical}},
        given to the nearest called ancestor's local rule."""
        by_path = {o.path: k for k, o in self._owners.items()}
        extra: dict[int, dict[str, str]] = {}
        for owner in self._owners.values():
            if owner.calls or not owner.own:
                continue
            parts = owner.path.split(".") if owner.path else []
            for cut in range(len(parts) - 1, -1, -1):
                anc = by_path.get(".".join(parts[:cut]))
                if anc is not None and self._owners[anc].calls:
                    rel = ".".join(parts[cut:])
                    extra.setdefault(anc, {}).update(
                        {f"{rel}.{loc}": c for loc, c in owner.own.items()}
                    )
                    break
            else:
                failed.update(owner.own.values())
        return extra

    def _call_grads(
        self, module, rule, owner: _Owner, call: Call, orphans, done=frozenset(), groups=1
    ):
        """[(names, {local: [R/groups, *shape]} or None)] for one call: the module's own
        parameters (closed-form rule — on the folded groups where it allows —, else the local
        rule) and any orphans (local rule)."""
        rows = self._rows
        parts = []
        own = {k: c for k, c in owner.own.items() if c not in done}
        if own:
            got = None
            if rule is not None and groups > 1 and layer_folds(module):
                folded = _folded(call, rows, groups)
                got = rule(module, folded, rows // groups) if folded is not None else None
            if got is None:
                got = rule(module, call, rows) if rule is not None else None
                if got is None and not call.merged:  # (no local rule over merged tokens)
                    got = _local(module, call, rows, list(own))
                got = _summed(got, groups)
            parts.append((own, got))
        if orphans:
            parts.append((orphans, _summed(_local(module, call, rows, list(orphans)), groups)))
        return parts


def _local(module, call: Call, rows: int, names: list[str]):
    try:
        return local_rule(module, call, rows, names)
    except (RuntimeError, ValueError, NotImplementedError):
        return None
