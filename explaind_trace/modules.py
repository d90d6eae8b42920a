"""A cached view of the recorded model's submodules, for the per-forward and per-step hooks.

The hooks used to walk ``named_modules()`` five times per optimizer step (the mode flags,
and for the forward and the step records a buffer signature and a snapshot each).
``ModuleIndex`` keeps one walk and on each use only checks that the module tree is unchanged
(the same children under every module; a changed tree is walked again). Buffers are read
from each module's ``_buffers`` on every call, so registered, replaced or removed buffers
are seen at once. ``BufferTracker`` copies the buffers once per change, not once per record.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .packing import copy_named

__all__ = ["ModuleIndex", "BufferTracker"]


class ModuleIndex:
    """``model.named_modules()``, revalidated cheaply instead of walked on every call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._named: list[tuple[str, torch.nn.Module]] = []
        self._prefixed: list[tuple[str, torch.nn.Module]] = []
        self._tree: list[int] = []
        self._rebuild()

    def _children(self) -> list[int]:
        # every module of the tree is in _named (held there, so ids are not reused)
        return [id(c) for _, m in self._named for c in m._modules.values()]

    def _rebuild(self) -> None:
        self._named = list(self.model.named_modules())
        self._prefixed = [(f"{name}." if name else "", m) for name, m in self._named]
        self._tree = self._children()

    def _current(self) -> None:
        if self._children() != self._tree:
            self._rebuild()

    def modules(self) -> list[tuple[str, torch.nn.Module]]:
        """``(name, module)`` as ``named_modules()`` lists them (the root first, named "")."""
        self._current()
        return self._named

    def mode_overrides(self) -> dict[str, bool]:
        """Submodules whose training flag differs from the root's."""
        self._current()
        root = self.model.training
        return {name: m.training for name, m in self._named if name and m.training != root}

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """``named_buffers()`` of the model: non-None buffers, each tensor once."""
        self._current()
        out: list[tuple[str, torch.Tensor]] = []
        seen: set[int] = set()
        for prefix, m in self._prefixed:
            for key, b in m._buffers.items():
                if b is None or id(b) in seen:
                    continue
                seen.add(id(b))
                out.append((prefix + key, b))
        return out


class BufferTracker:
    """Buffer snapshots, copied to CPU once per buffer state and shared by every record.

    A buffer counts as changed when its tensor was replaced or its in-place version counter
    moved. ``snapshot_if_changed(consumer)`` answers for one consumer (the forward records,
    the step records), each compared with the state it last received; ``snapshot()`` is the
    current state. All of them hand out the same mapping of CPU copies while the buffers stay
    unchanged, so callers must not modify what they get.
    """

    def __init__(self, index: ModuleIndex) -> None:
        self.index = index
        self._last: dict[str, dict[str, tuple[int, int]]] = {}
        self._copy_sig: dict[str, tuple[int, int]] | None = None
        self._copy: Mapping[str, torch.Tensor] = {}
        # the tensors behind _copy_sig, held so that their ids cannot be reused
        self._copy_sources: list[torch.Tensor] = []

    def _state(self) -> tuple[list[tuple[str, torch.Tensor]], dict[str, tuple[int, int]]]:
        named = self.index.named_buffers()
        return named, {n: (id(b), b._version) for n, b in named}

    def _shared_copy(
        self, named: list[tuple[str, torch.Tensor]], sig: dict[str, tuple[int, int]]
    ) -> Mapping[str, torch.Tensor]:
        if sig != self._copy_sig:
            self._copy = copy_named(named)
            self._copy_sig = sig
            self._copy_sources = [b for _, b in named]
        return self._copy

    def snapshot_if_changed(self, consumer: str) -> Mapping[str, torch.Tensor] | None:
        """The buffers, or None when unchanged since ``consumer``'s last snapshot."""
        named, sig = self._state()
        if sig == self._last.get(consumer):
            return None
        self._last[consumer] = sig
        return self._shared_copy(named, sig)

    def snapshot(self) -> Mapping[str, torch.Tensor]:
        """The buffers now (CPU copies)."""
        return self._shared_copy(*self._state())
