"""When the trace writer runs its Python: while the training thread is inside a backward.

The writer's encoding is partly pure Python (packing maps, row ids, RNG deltas), and a
thread running Python holds the GIL. The training thread needs the GIL almost all the time
in a forward (module calls, hooks, small ops), but hardly at all inside ``backward()``:
autograd's engine runs in C++ with the GIL released. Measured on the bench's p = 97
Transformer (``bench/bench_trace_bytes.py``), a writer that started each step's encoding as
soon as the step was handed over did it during the next forward and cost that forward about
2 ms of waiting for the GIL per step; the same work done inside the backward cost it almost
nothing.

So the writer waits at the start of each job and at its pacing points (``GilPacer``) until
a recorded backward is running (the first cotangent hook of a backward opens the gate; a
callback autograd runs at that backward's end closes it), or until the training thread
itself waits for the writer (a full queue, ``flush()``, ``close()``), which holds the gate
open. It never waits more than ``max_wait`` seconds per closed stretch: after that it runs
freely until the gate has opened and closed again, so a loop whose backward windows are
rare or short delays the trace by at most ``max_wait``, never stops it. Before the first
recorded backward has ended the gate is open.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .hooks import graph_task

__all__ = ["WriterGate"]


class WriterGate:
    """Open while a recorded backward runs or the training thread waits for the writer."""

    def __init__(self, *, max_wait: float = 0.05) -> None:
        self.max_wait = max_wait
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._holds = 0  # training-thread waits in progress
        self._backward = False
        self._task: int | None = None  # the graph task whose end will close the gate
        self._closed_epoch = 0  # counts closings; a timed-out wait frees the writer for one
        self._free_epoch = -1
        self.enabled = True  # False once autograd refused the end-of-backward callback

    @property
    def is_open(self) -> bool:
        """Whether the writer may run now."""
        return self._open.is_set()

    # -- training side ----------------------------------------------------------------

    def backward_started(self) -> None:
        """A recorded output got its cotangent: a backward runs now (called from the hook,
        on the thread running that backward). Opens the gate until the backward ends."""
        if not self.enabled:
            return
        task = graph_task()
        with self._lock:
            if self._backward and task == self._task:
                return
            self._backward, self._task = True, task
            self._open.set()
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
        except (RuntimeError, AttributeError):  # no end-of-backward callback: never gate
            self.enabled = False
            with self._lock:
                self._backward = False

    def _backward_ended(self) -> None:
        with self._lock:
            self._backward = False
            self._task = None
            if self._holds == 0:
                self._open.clear()
                self._closed_epoch += 1

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """The training thread waits for the writer inside this block: let it run."""
        with self._lock:
            self._holds += 1
            self._open.set()
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                if self._holds == 0 and not self._backward:
                    self._open.clear()
                    self._closed_epoch += 1

    # -- writer side ------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the gate is open, at most ``max_wait`` per closed stretch."""
        if self._open.is_set() or not self.enabled:
            return
        epoch = self._closed_epoch
        if epoch == self._free_epoch:
            return
        if not self._open.wait(self.max_wait):
            self._free_epoch = epoch
