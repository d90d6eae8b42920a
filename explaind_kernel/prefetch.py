"""Read and replay the trace one segment ahead of the sweep, in a background thread.

The sweep goes backward in time; each item is one checkpoint segment [start, stop), replayed
forward by the trace reader (θ_t rebuilt from the checkpoint), with the buffers each step
needs; a trace recorded with the cotangent codec gets its forwards' cotangents rebuilt here
(`cotangent_resolver`: the forward run again at θ_t in the recorded dtype and device), so the
sweep sees plain tensors. Only this thread touches the reader while the sweep runs. The thread
is always joined.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from explaind_trace.cotangents import needs_resolving, replay_device, resolve_forwards

_DONE = object()


@dataclass
class StepBundle:
    step: Any  # explaind_trace.ReplayStep
    buffers: dict  # b_t: buffers after step t's forwards (the eval model at step t)
    buffers_before: dict  # buffers before step t's first forward


def _segment(reader, start: int, stop: int, resolve=None, replay_args=None) -> list[StepBundle]:
    out = []
    prev = reader.buffers_at(start - 1) if start > 0 else reader.checkpoint(0).buffers
    for rs in reader.replay(start, stop, **(replay_args or {})):
        if resolve is not None:  # codec-stored cotangents, rebuilt from the replayed logits
            resolve(rs, prev)
        cur = reader.buffers_at(rs.index)
        out.append(StepBundle(rs, cur, prev))
        prev = cur
    return out


def codec_cotangents(reader) -> bool:
    """Whether the trace was recorded with the cotangent codec (its header's options)."""
    options = getattr(getattr(reader, "meta", None), "options", None)
    return getattr(options, "cotangent_codec", "generic") != "generic"


def cotangent_resolver(problem):
    """`resolve(step, buffers_before)` for the prefetcher: rebuilds, in place, the
    codec-stored cotangents of a replayed step from its forwards run again at θ_t in the
    recorded dtype and device (never the compute dtype: float64 logits are not the recorded
    float32 ones); None when the trace has none."""
    model = getattr(problem, "trace_model", None)
    if model is None:
        return None
    meta = problem.reader.meta
    device = replay_device(str(getattr(meta, "device", "cpu")))

    def resolve(step, buffers_before) -> None:
        if needs_resolving(step.record.forwards):
            resolve_forwards(
                step.record.forwards,
                model=model,
                params=step.params,
                buffers=buffers_before,
                output_module=getattr(meta, "output_module", None),
                device=device,
            )

    return resolve


class SegmentPrefetcher:
    """Iterates segments last-first; `enabled=False` reads them inline. `resolve(step,
    buffers_before)`, when given, is called on every replayed step before it is handed out
    (`cotangent_resolver`)."""

    def __init__(
        self,
        reader,
        *,
        enabled: bool = True,
        depth: int = 1,
        segments=None,
        resolve=None,
        replay_args=None,
    ) -> None:
        self.reader = reader
        self.resolve = resolve
        #: keywords of reader.replay (KernelProblem.replay_args: the model of a trace whose
        #: replay recomputes gradients)
        self.replay_args = dict(replay_args or {})
        self.segments = list(reversed(reader.segments() if segments is None else segments))
        self.enabled = enabled
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        try:
            for a, b in self.segments:
                item = _segment(self.reader, a, b, self.resolve, self.replay_args)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_DONE)
        except BaseException as e:  # handed to the consumer
            self._q.put(e)

    def __iter__(self) -> Iterator[list[StepBundle]]:
        if not self.enabled:
            for a, b in self.segments:
                yield _segment(self.reader, a, b, self.resolve, self.replay_args)
            return
        self._thread = threading.Thread(target=self._work, name="explaind-prefetch", daemon=True)
        self._thread.start()
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None
