"""Background trace writer: encodes, compresses and commits records off the training thread.

The training thread only copies tensors to CPU and hands them over through a bounded queue
(back-pressure instead of unbounded memory). The writer does its work while the training
thread is inside a recorded backward, which runs without the GIL (``gate.py``). Each job is
one atomic store commit that also rewrites the ``progress`` record, so progress always
describes committed data. A failure in the thread is kept and re-raised in the training
thread as ``TraceWriteError`` by ``check()``/``submit()``/``close()`` (its message says
"disk full" when that is the cause); when space allows, the failure is also written into the
trace's progress record, so ``explaind info`` says "stopped by an error: disk full ...".
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from . import codec
from .encoder import TensorEncoder
from .errors import DiskFullError, ExplaindError, NotATraceError, TraceExistsError, TraceWriteError
from .gate import WriterGate
from .records import CapturedForward, CapturedStep, Checkpoint
from .schema import META, PROGRESS
from .state import encode_final
from .steps import encode_skip, encode_step
from .stores import Store, open_store

__all__ = ["TraceWriter", "open_new_trace"]

logger = logging.getLogger(__name__)


def open_new_trace(spec: Any) -> Store:
    """Open ``spec`` for writing a new trace; never reuses a trace or foreign data."""
    store = open_store(spec, readonly=False)
    try:
        if store.get(META) is not None:
            raise TraceExistsError(
                f"a trace already exists at {spec}; traces are never overwritten. "
                "Choose a new path, or delete the old trace first."
            )
        if next(iter(store.keys()), None) is not None:
            raise NotATraceError(
                f"{spec} holds data that is not an ExPLAIND trace; it was left untouched. "
                "Choose a new path for the trace."
            )
    except BaseException:
        store.close()
        raise
    return store


@dataclass
class _Meta:
    meta: dict[str, Any]


@dataclass
class _Skip:
    before_step: int
    reason: str
    forwards: list[CapturedForward]


@dataclass
class _Final:
    state: Checkpoint | None
    error: str | None


_STOP = object()


class TraceWriter:
    """One thread, one store, one commit per submitted job."""

    def __init__(
        self,
        store: Store,
        *,
        grad_codec: str = "lossless",
        cotangent_codec: str = "generic",
        level: int = 1,
        queue_size: int = 8,
        checksums: bool = True,
    ) -> None:
        self.store = store
        #: the recorder opens it while a recorded backward runs (see ``gate.py``)
        self.gate = WriterGate()
        self.encoder = TensorEncoder(
            grad_codec=grad_codec,
            cotangent_codec=cotangent_codec,
            level=level,
            checksums=checksums,
            gate=self.gate,
        )
        self.progress: dict[str, Any] = {
            "steps": 0,
            "finished": False,
            "final": False,
            "skipped": 0,
            "error": None,
            "stored_bytes": 0,
            "raw_bytes": 0,
            "kind_bytes": dict(self.encoder.kind_bytes),
        }
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="explaind-trace-writer", daemon=True)
        self._thread.start()

    # -- training-thread side -------------------------------------------------------------

    def check(self) -> None:
        """Raise ``TraceWriteError`` if the writer thread has failed."""
        e = self._error
        if e is not None:
            raise TraceWriteError(
                f"writing the trace to {self.store!r} failed: {_reason(e)}. "
                f"The {self.progress['steps']} step(s) committed before the failure stay "
                "readable; fix the cause (disk space, permissions, store backend) and record "
                "again."
            ) from e

    def _submit(self, job: Any) -> None:
        blocking = False
        with contextlib.ExitStack() as held:
            while True:
                self.check()
                if not self._thread.is_alive():
                    raise TraceWriteError("the trace writer thread is not running")
                try:
                    self._queue.put(job, block=blocking, timeout=0.1)
                    return
                except queue.Full:
                    if not blocking:  # back-pressure: the writer runs while we wait
                        held.enter_context(self.gate.held_open())
                        blocking = True

    def write_meta(self, meta: dict[str, Any]) -> None:
        self._submit(_Meta(meta))

    def write_step(self, step: CapturedStep) -> None:
        self._submit(step)

    def write_skip(self, before_step: int, reason: str, forwards: list[CapturedForward]) -> None:
        self._submit(_Skip(before_step, reason, forwards))

    def write_final(self, state: Checkpoint | None, error: str | None) -> None:
        self._submit(_Final(state, error))

    def flush(self) -> None:
        """Block until every submitted job is committed; raise if writing failed."""
        with self.gate.held_open():
            self._queue.join()
        self.check()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def close(self) -> None:
        """Drain the queue, stop and join the thread; raise ``TraceWriteError`` on failure."""
        with self.gate.held_open():
            while self._thread.is_alive():
                try:
                    self._queue.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self.check()

    # -- writer-thread side ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:  # after a failure: drain without writing
                    self.gate.wait()  # the training thread's forward goes first
                    self._commit(job)
            except BaseException as e:  # kept and re-raised in the training thread
                logger.error("trace writer failed: %s: %s", type(e).__name__, e)
                self._error = e
                self._record_failure(e)
            finally:
                self._queue.task_done()

    def _record_failure(self, e: BaseException) -> None:
        """Write the failure into the progress record of the trace, when space allows; the
        progress still describes only what was committed before."""
        progress = {**self.progress, "finished": False, "error": " ".join(_reason(e).split())}
        try:
            self.store.put(PROGRESS, codec.pack(progress, checksum=self.encoder.checksums))
            self.store.commit()
        except BaseException as again:  # no space even for that: the exception says it all
            logger.warning("the failure could not be written into the trace: %s", again)
            return
        self.progress = progress

    def _commit(self, job: Any) -> None:
        enc = self.encoder
        progress = dict(self.progress)
        if isinstance(job, _Meta):
            items = [(META, codec.pack(job.meta, checksum=self.encoder.checksums))]
            enc.param_names = [p["name"] for p in job.meta["params"]]
            enc.header_groups = [g["hyperparams"] for g in job.meta["optimizer"]["groups"]]
        elif isinstance(job, CapturedStep):
            items = encode_step(enc, job)
            progress["steps"] = job.index + 1
            if job.switch_reason is not None:  # gradients="auto": stored from this step on
                progress["gradients_stored_from"] = job.index
                progress["gradients_switch_reason"] = job.switch_reason
        elif isinstance(job, _Skip):
            items = encode_skip(enc, progress["skipped"], job.before_step, job.reason, job.forwards)
            progress["skipped"] += 1
        elif isinstance(job, _Final):
            items = encode_final(enc, job.state) if job.state is not None else []
            progress["final"] = job.state is not None
            progress["finished"] = job.error is None
            progress["error"] = job.error
        else:  # pragma: no cover - internal misuse
            raise TypeError(f"unknown writer job {job!r}")
        progress["stored_bytes"] = enc.stored_bytes
        progress["raw_bytes"] = enc.raw_bytes
        progress["kind_bytes"] = dict(enc.kind_bytes)
        for key, value in items:
            self.store.put(key, value)
            enc.pace()
        self.store.put(PROGRESS, codec.pack(progress, checksum=self.encoder.checksums))
        self.store.commit()
        self.progress = progress


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full filesystem."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _reason(e: BaseException) -> str:
    """What went wrong, starting with "disk full" when that is the cause."""
    text = str(e) if isinstance(e, ExplaindError) else f"{type(e).__name__}: {e}"
    if _disk_full(e) and not text.startswith("disk full"):
        text = f"disk full: {text}"
    return text.rstrip(". ")
