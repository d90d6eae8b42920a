"""Recording overhead measured side by side: a plain and a recorded twin of one training,
alternating in blocks of steps in one process.

This VM's speed drifts by up to 2x within minutes (plain 100-step runs of the same code took
3.8-7.0 s in one bench), so whole runs timed one after the other compare different machines.
Here two copies of the same seeded setup train in turn, ``block`` steps each, and each
twin's time is summed over its blocks: drift slower than a block falls on both alike.

Nothing of the recording is left out of its twin's time, and nothing of it falls into the
plain twin's: ``record()``'s entry (header, θ_0 checkpoint) and exit (final record, close)
count, and the recorder is flushed at the end of each of its blocks, inside its time, so its
background writer is idle while the plain twin runs. The flush also costs the recorded twin
the writer's overlap with the next block (one step's encoding per block), so the ratio is,
if anything, above that of an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

import explaind_trace as et

#: ``make()``: a fresh seeded ``(model, optimizer, x, y, batch)``
Setup = Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor, int]]


def train_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    g: torch.Generator,
    n: int,
) -> None:
    """``n`` steps of cross-entropy training on random batches drawn with ``g``."""
    for _ in range(n):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


class _Clock:
    """Wall, process-CPU and this-thread-CPU seconds summed over the timed stretches."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.main = 0.0

    def __enter__(self) -> _Clock:
        self._t = (time.perf_counter(), time.process_time(), time.thread_time())
        return self

    def __exit__(self, *exc: object) -> None:
        w, c, m = self._t
        self.wall += time.perf_counter() - w
        self.cpu += time.process_time() - c
        self.main += time.thread_time() - m


def interleaved_overhead(
    make: Setup,
    *,
    store: str,
    steps: int,
    block: int = 20,
    record_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One side-by-side measurement (see the module docstring): seconds of each twin (wall,
    process CPU, training-thread CPU), the recorded twin's trace in ``store``."""
    plain_setup, rec_setup = make(), make()
    g_plain, g_rec = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    plain, rec, flushes = _Clock(), _Clock(), _Clock()
    with rec:
        recording = et.record(rec_setup[0], rec_setup[1], store=store, **(record_kwargs or {}))
        recorder = recording.__enter__()
    try:
        done = 0
        while done < steps:
            n = min(block, steps - done)
            with plain:
                train_steps(*plain_setup, g_plain, n)
            with rec:
                train_steps(*rec_setup, g_rec, n)
                with flushes:
                    recorder.flush()
            done += n
    except BaseException as e:
        recording.__exit__(type(e), e, e.__traceback__)
        raise
    with rec:
        recording.__exit__(None, None, None)
    return {
        "plain_seconds": plain.wall,
        "recorded_seconds": rec.wall,
        "ratio": rec.wall / plain.wall,
        # of recorded_seconds: waiting at the blocks' ends for the writer to catch up
        "flush_seconds": flushes.wall,
        "plain_cpu_seconds": plain.cpu,
        "recorded_cpu_seconds": rec.cpu,
        "cpu_ratio": rec.cpu / plain.cpu,
        "training_thread_cpu_ratio": rec.main / plain.main,
        # the writer is idle during the plain blocks (flushed), so the process CPU beyond
        # the training thread's in the recorded blocks is the writer's
        "writer_cpu_ms_per_step": 1000 * ((rec.cpu - rec.main) - (plain.cpu - plain.main)) / steps,
    }
