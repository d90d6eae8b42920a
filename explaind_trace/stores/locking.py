"""One writer per store across processes: an advisory lock held for the writer's life.

A writable store takes an exclusive ``flock`` on a small file inside its directory before
it touches anything else, and holds it until ``close``. A second writer (another process,
or another open in this one) fails at once with ``TraceExistsError``; the lock dies with
its process, so a killed recorder leaves no stale lock behind. Readers never take it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import StoreError, TraceExistsError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "WriterLock"]

LOCK_NAME = ".explaind-writer"


class WriterLock:
    """An exclusive advisory lock on ``directory/.explaind-writer``; ``release`` frees it."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create the writer lock {self.path}: {e}") from e
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise TraceExistsError(
                    f"another writer is recording into {Path(directory)} right now (it holds "
                    f"{self.path}); a trace has one writer. Choose another path for this run."
                ) from None
            except OSError as e:
                os.close(fd)
                raise StoreError(f"cannot lock {self.path}: {e}") from e
        self._fd = fd

    def release(self) -> None:
        """Free the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock
