"""The writer's gate (explaind_trace/gate.py): open while a recorded backward runs or the
training thread waits for the writer, closed otherwise, never holding the writer back for
more than ``max_wait`` per closed stretch; and a recording gated that way loses nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explaind_trace as et
from explaind_trace import gate as gate_module
from explaind_trace import writer as writer_module
from explaind_trace.gate import WriterGate


def _backward(gate: WriterGate, *, states: list[bool] | None = None) -> None:
    """One backward whose output hook calls ``gate.backward_started`` (as the recorder's
    cotangent hook does); ``states`` gets the gate's state inside the backward."""
    w = torch.randn(3, requires_grad=True)
    out = w * 2.0

    def hook(g: torch.Tensor) -> None:
        gate.backward_started()
        if states is not None:
            states.append(gate.is_open)

    out.register_hook(hook)
    out.sum().backward()


def test_open_before_the_first_backward_then_only_inside_backwards() -> None:
    gate = WriterGate()
    assert gate.is_open
    inside: list[bool] = []
    _backward(gate, states=inside)
    assert inside == [True]
    assert not gate.is_open  # closed by the end-of-backward callback
    _backward(gate, states=inside)
    assert inside == [True, True] and not gate.is_open
    assert gate.enabled


def test_a_backward_that_raised_does_not_keep_the_next_one_from_closing() -> None:
    gate = WriterGate()
    w = torch.randn(3, requires_grad=True)
    out = w * 2.0
    out.register_hook(lambda g: gate.backward_started())
    w.register_hook(lambda g: (_ for _ in ()).throw(ValueError("hook failed")))
    with pytest.raises(ValueError, match="hook failed"):
        out.sum().backward()
    _backward(gate)
    assert not gate.is_open


def test_held_open_while_the_training_thread_waits() -> None:
    gate = WriterGate()
    _backward(gate)
    assert not gate.is_open
    with gate.held_open():
        assert gate.is_open
        with gate.held_open():
            assert gate.is_open
        assert gate.is_open
    assert not gate.is_open


def test_held_open_across_a_backward_stays_open_to_its_end() -> None:
    gate = WriterGate()
    with gate.held_open():
        _backward(gate)
        assert gate.is_open  # the backward's end does not close a held gate
    assert not gate.is_open


class _SpyEvent:
    """A closed event whose waits are counted (and time out at once)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return False


def test_the_writer_waits_at_most_max_wait_per_closed_stretch() -> None:
    gate = WriterGate(max_wait=0.25)
    _backward(gate)
    spy = _SpyEvent()
    gate._open = spy  # type: ignore[assignment]
    for _ in range(5):
        gate.wait()
    assert spy.waits == [0.25]  # one timed-out wait, then free until the gate moves
    with gate.held_open():
        gate.wait()  # open: no wait
    assert spy.waits == [0.25]
    for _ in range(3):
        gate.wait()  # a new closed stretch: one wait again
    assert spy.waits == [0.25, 0.25]


def test_without_an_end_of_backward_callback_the_gate_stays_open() -> None:
    gate = WriterGate()
    gate.backward_started()  # not inside a backward: autograd refuses the callback
    assert not gate.enabled and gate.is_open
    _backward(gate)
    assert gate.is_open
    gate.wait()  # returns at once


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("gradients", ["stored", "recompute"])
def test_a_gated_recording_commits_every_step(
    monkeypatch: pytest.MonkeyPatch, gradients: str
) -> None:
    # a writer that never stops waiting on its own: only backwards, a full queue (queue_size
    # 2 of 12 steps), flush() and close() let it run, and the recording must still complete
    monkeypatch.setattr(gate_module.WriterGate.__init__, "__kwdefaults__", {"max_wait": 3600.0})
    seen: list[str] = []
    closed: list[bool] = []  # the writer found the gate closed and waited
    commit, wait = writer_module.TraceWriter._commit, gate_module.WriterGate.wait

    def spy(self: writer_module.TraceWriter, job: object) -> None:
        seen.append(type(job).__name__)
        commit(self, job)

    def spy_wait(self: WriterGate) -> None:
        closed.append(not self.is_open)
        wait(self)

    monkeypatch.setattr(writer_module.TraceWriter, "_commit", spy)
    monkeypatch.setattr(gate_module.WriterGate, "wait", spy_wait)
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 8, 4), torch.randint(0, 3, (12, 8))
    with et.record(
        model, opt, store="memory://gated-" + gradients, gradients=gradients, queue_size=2
    ) as rec:
        assert rec.writer.gate.max_wait == 3600.0
        for t in range(12):
            loss = nn.functional.cross_entropy(model(x[t]), y[t])
            opt.zero_grad()
            loss.backward()
            opt.step()
        rec.flush()
    assert seen.count("CapturedStep") == 12
    assert any(closed)  # it was held back, and let go by backwards, back-pressure and flush
    with et.open_trace("memory://gated-" + gradients) as trace:
        assert trace.num_steps == 12 and trace.finished
        assert [trace.step(t).index for t in range(12)] == list(range(12))
    et.stores.memory.MemoryStore.drop("gated-" + gradients)
