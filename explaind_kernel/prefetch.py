"""Read and replay the trace one segment ahead of the sweep, in a background thread.

The sweep goes backward in time; each item is one checkpoint segment [start, stop), replayed
forward by the trace reader (θ_t rebuilt from the checkpoint), with the buffers each step
needs. Only this thread touches the reader while the sweep runs. The thread is always joined.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_DONE = object()


@dataclass
class StepBundle:
    step: Any  # explaind_trace.ReplayStep
    buffers: dict  # b_t: buffers after step t's forwards (the eval model at step t)
    buffers_before: dict  # buffers before step t's first forward


def _segment(reader, start: int, stop: int) -> list[StepBundle]:
    out = []
    prev = reader.buffers_at(start - 1) if start > 0 else reader.checkpoint(0).buffers
    for rs in reader.replay(start, stop):
        cur = reader.buffers_at(rs.index)
        out.append(StepBundle(rs, cur, prev))
        prev = cur
    return out


class SegmentPrefetcher:
    """Iterates segments last-first; `enabled=False` reads them inline."""

    def __init__(self, reader, *, enabled: bool = True, depth: int = 1, segments=None) -> None:
        self.reader = reader
        self.segments = list(reversed(reader.segments() if segments is None else segments))
        self.enabled = enabled
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        try:
            for a, b in self.segments:
                item = _segment(self.reader, a, b)
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
                yield _segment(self.reader, a, b)
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
