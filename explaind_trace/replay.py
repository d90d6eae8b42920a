"""Rebuild θ_t by replaying the recorded optimizer on the recorded gradients.

From the nearest checkpoint at or before ``start``: a fresh optimizer of the recorded
(registered) class over cloned parameters, with the recorded param groups and state; for
each step, ``p.grad`` and the group hyperparameters come from the record, then ``step()``.
On CPU this reproduces training bit for bit. At every later checkpoint (and at the final
state) the rebuilt values are compared with the stored ones; differences are reported
and the stored values win.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .errors import ModelRequiredError, TraceCorruptError
from .optimizers import export_state, load_state, optimizer_class_by_name, restore_hyperparams
from .recompute import GradientRecompute
from .records import Checkpoint, StepRecord, TraceMeta
from .state import optimizer_digest

__all__ = ["ReplayStep", "DriftReport", "ReplaySource", "replay_steps"]

logger = logging.getLogger(__name__)


class ReplaySource(Protocol):
    """What replay reads of a trace (``TraceReader`` is one)."""

    name: str
    meta: TraceMeta
    lossy: bool
    num_steps: int
    param_names: list[str]
    checkpoint_steps: list[int]

    def step(self, t: int) -> StepRecord:
        """The full record of step ``t``."""
        ...

    def step_update(
        self, t: int
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, str]]]:
        """Only the gradients, group hyperparameters and tensor-typed keys of step ``t``."""
        ...

    def checkpoint(self, t: int) -> Checkpoint:
        """The stored state before step ``t``."""
        ...

    def final(self) -> Checkpoint | None:
        """The state when recording ended; None when the run has none."""
        ...

    def buffers_at(self, t: int) -> dict[str, torch.Tensor]:
        """The buffers after step ``t``'s forwards."""
        ...


@dataclass
class ReplayStep:
    """θ_t, θ_{t+1} and the optimizer state around step ``index``."""

    index: int
    params: dict[str, torch.Tensor]
    next_params: dict[str, torch.Tensor]
    state_before: dict[str, dict[str, Any]]
    state_after: dict[str, dict[str, Any]]
    record: StepRecord


@dataclass
class DriftReport:
    """Replayed vs stored values at each checkpoint (key: the step the state precedes).

    ``checkpoints``: max abs difference over all parameters; ``state``: over the optimizer
    state tensors; ``params``: per parameter, only where it differs. Zero means bitwise equal.
    """

    checkpoints: dict[int, float] = field(default_factory=dict)
    state: dict[int, float] = field(default_factory=dict)
    params: dict[int, dict[str, float]] = field(default_factory=dict)
    lossy: bool = False

    @property
    def max_abs_diff(self) -> float:
        vals = [*self.checkpoints.values(), *self.state.values()]
        return max(vals, default=0.0)

    @property
    def exact(self) -> bool:
        """Every checked parameter and state tensor matched bit for bit."""
        return all(v == 0.0 for v in (*self.checkpoints.values(), *self.state.values()))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    if torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    ):
        return 0.0
    if not (a.is_floating_point() or a.is_complex()):
        return float((a.long() - b.long()).abs().max())
    return float((a.double() - b.double()).abs().max())


def _compare(
    t: int,
    rebuilt: dict[str, torch.Tensor],
    state: dict[str, dict[str, Any]],
    stored: Checkpoint,
    report: DriftReport,
) -> None:
    per = {n: _diff(p, stored.params[n]) for n, p in rebuilt.items() if n in stored.params}
    report.checkpoints[t] = max(per.values(), default=0.0)
    bad = {n: d for n, d in per.items() if d != 0.0}
    if bad:
        report.params[t] = bad
    sdiff = 0.0
    if stored.optimizer_digest is not None:  # the final record: the state's digest only
        sdiff = 0.0 if optimizer_digest(state) == stored.optimizer_digest else float("inf")
    for name, st in stored.optimizer_state.items():
        mine = state.get(name, {})
        for k, v in st.items():
            w = mine.get(k)
            if isinstance(v, torch.Tensor):
                sdiff = max(sdiff, _diff(w, v) if isinstance(w, torch.Tensor) else float("inf"))
            elif w != v:
                sdiff = float("inf")
    report.state[t] = sdiff
    if report.checkpoints[t] != 0.0 or sdiff != 0.0:
        log = logger.info if report.lossy else logger.warning
        log(
            "replay drift at step %d: parameters differ by up to %.3g, optimizer state by up to %.3g "
            "(continuing from the stored checkpoint)",
            t,
            report.checkpoints[t],
            sdiff,
        )


class _Replayer:
    """The recorded optimizer over rebuilt parameters on ``device`` (the CPU, or in the
    recompute mode the model's device, where training ran); hands out CPU copies."""

    def __init__(
        self, reader: ReplaySource, ckpt: Checkpoint, device: torch.device | None = None
    ) -> None:
        meta = reader.meta
        cls = optimizer_class_by_name(meta.optimizer.class_name, meta.optimizer.rule)
        dev = device or torch.device("cpu")
        self.params = {
            n: ckpt.params[n].to(dev, copy=True).requires_grad_(True) for n in reader.param_names
        }
        self.names = {id(p): n for n, p in self.params.items()}
        groups = []
        for g in meta.optimizer.groups:
            group: dict[str, Any] = {"params": [self.params[n] for n in g.params]}
            restore_hyperparams(group, g.hyperparams, g.tensor_hyperparams)
            groups.append(group)
        self.order = [n for g in meta.optimizer.groups for n in g.params]
        self.opt = cls(groups)
        load_state(self.opt, ckpt.optimizer_state, self.order)

    def step(
        self,
        grads: dict[str, torch.Tensor],
        groups: list[dict[str, Any]],
        tkeys: list[dict[str, str]],
    ) -> None:
        for gi, group in enumerate(self.opt.param_groups):
            restore_hyperparams(group, groups[gi], tkeys[gi] if gi < len(tkeys) else None)
        for n, p in self.params.items():
            g = grads.get(n)
            p.grad = None if g is None else g.to(p.device, copy=True)
        self.opt.step()
        for p in self.params.values():
            p.grad = None

    def reset(self, ckpt: Checkpoint) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(ckpt.params[n])
        if ckpt.optimizer_digest is None:  # a final record keeps only the state's digest
            load_state(self.opt, ckpt.optimizer_state, self.order)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}

    def state(self) -> dict[str, dict[str, Any]]:
        return export_state(self.opt, self.names)


def _replaying(reader: ReplaySource, t: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; an optimizer that cannot take the recorded values (a damaged record the
    decoders let through) raises ``TraceCorruptError`` naming the step, not a raw error."""
    try:
        return fn(*args)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise TraceCorruptError(
            f"{reader.name}: step {t} cannot be replayed from the recorded state and "
            f"hyperparameters ({type(e).__name__}: {e}); the trace is damaged. Restore it from "
            "a copy; `explaind info --verify` lists what is intact."
        ) from e


def _recomputed(
    reader: ReplaySource,
    recompute: GradientRecompute | None,
    t: int,
    params: dict[str, torch.Tensor],
    record: StepRecord,
) -> dict[str, torch.Tensor]:
    """The gradients of a step recorded without them, recomputed and checked (recompute.py)."""
    if recompute is None:
        raise ModelRequiredError(
            f"{reader.name}: step {t} was recorded with gradients="
            f"{reader.meta.options.gradients!r}: its gradient is not stored but recomputed from "
            "the recorded forwards, which needs the model. Pass the traced model: "
            "trace.replay(model=model), trace.params_at(t, model=model)."
        )
    prev = reader.buffers_at(t - 1) if t > 0 else reader.checkpoint(0).buffers
    pairs = []
    for f in record.forwards:
        if f.buffers is not None:
            prev = f.buffers
        pairs.append((f, prev))
    assert record.fingerprints is not None  # a recompute step (checked by the caller)
    return recompute.gradients(t, params, pairs, record.fingerprints)


def replay_steps(
    reader: ReplaySource,
    start: int,
    stop: int,
    *,
    with_state: bool = True,
    report: DriftReport | None = None,
    recompute: GradientRecompute | None = None,
) -> Iterator[ReplayStep]:
    """Yield ``ReplayStep`` for ``t`` in ``range(start, stop)`` (see module docstring).

    Steps recorded without gradients (``gradients="recompute"``/``"auto"``) have them
    recomputed by ``recompute`` at the rebuilt θ_t and checked against their fingerprints
    (``GradientMismatchError`` on a mismatch); ``ReplayStep.record.grads`` holds them."""
    if start >= stop:
        return
    full_records = reader.meta.options.gradients != "stored"
    report = report if report is not None else DriftReport(lossy=reader.lossy)
    ckpts = set(reader.checkpoint_steps)
    base = max((c for c in ckpts if c <= start), default=None)
    if base is None:
        raise KeyError(f"{reader.name}: no checkpoint at or before step {start}")
    device = recompute.device if recompute is not None else None
    rep = _replaying(reader, base, lambda: _Replayer(reader, reader.checkpoint(base), device))
    final = reader.final() if stop == reader.num_steps else None
    before = rep.snapshot()
    for t in range(base, stop):
        emit = t >= start
        if emit or full_records:
            record = reader.step(t)
            if record.fingerprints is not None:
                record.grads = _recomputed(reader, recompute, t, rep.params, record)
            grads, groups, tkeys = record.grads, record.groups, record.tensor_hyperparams
            state_before = rep.state() if with_state and emit else {}
        else:
            grads, groups, tkeys = reader.step_update(t)
        _replaying(reader, t, rep.step, grads, groups, tkeys)
        stored = None
        if t + 1 in ckpts:
            stored = reader.checkpoint(t + 1)
        elif t + 1 == reader.num_steps and final is not None:
            stored = final
        if stored is not None:
            _compare(t + 1, rep.snapshot(), rep.state(), stored, report)
            rep.reset(stored)
        after = rep.snapshot()
        if emit:
            yield ReplayStep(
                index=t,
                params=before,
                next_params=after,
                state_before=state_before,
                state_after=rep.state() if with_state else {},
                record=record,
            )
        before = after
