"""Directory store: ``dir://path``, one file per key.

A commit writes every value to a temporary file and moves it into place with
``os.replace``; the ``progress`` key is moved last, so a crash in the middle of a commit
leaves files the trace's progress record does not yet cover, and readers ignore them.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

from ..errors import DiskFullError, NotATraceError, StoreError, TraceCorruptError
from .base import Store
from .locking import LOCK_NAME, WriterLock
from .registry import register_store

__all__ = ["DirectoryStore"]

_MARKER = ".explaind-store"
_LAST = "progress"


def _escape(segment: str) -> str:
    if segment == "":
        return "%"
    out = quote(segment, safe="")
    if out.startswith("."):
        out = "%2E" + out[1:]
    if len(out.encode()) > 240:
        raise StoreError(f"key segment {segment[:40]!r}... is too long for a file name")
    return out


def _unescape(name: str) -> str:
    return "" if name == "%" else unquote(name)


@register_store("dir")
class DirectoryStore(Store):
    """A directory of files, one per key (``/`` in keys makes subdirectories)."""

    def __init__(
        self, path: str | os.PathLike[str], *, readonly: bool = False, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.fsync = fsync
        self._staged: dict[str, bytes] = {}
        self._lock: WriterLock | None = None
        marker = self.path / _MARKER
        if readonly:
            if not self.path.exists():
                raise StoreError(f"no trace at {self.path}: the path does not exist.")
            if not marker.is_file():
                raise NotATraceError(f"{self.path} is not an ExPLAIND directory store.")
            return
        if self.path.exists():
            if not self.path.is_dir():
                raise NotATraceError(
                    f"{self.path} exists and is a file; it was left untouched. Choose another path."
                )
            names = {p.name for p in self.path.iterdir()} - {LOCK_NAME}
            if names and not marker.is_file():
                raise NotATraceError(
                    f"{self.path} is a non-empty directory that is not an ExPLAIND store; it was "
                    "left untouched. Choose a new path (or an empty directory) for the trace."
                )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(f"cannot create directory store at {self.path}", e) from e
        self._lock = WriterLock(self.path)
        try:
            marker.write_text("explaind directory store v1\n")
        except OSError as e:
            self.close()
            raise _write_error(f"cannot create directory store at {self.path}", e) from e

    def _file(self, key: str) -> Path:
        return self.path.joinpath(*(_escape(s) for s in key.split("/")))

    def put(self, key: str, value: bytes) -> None:
        self._check_writable()
        self._file(key)  # validates the key early
        self._staged[key] = bytes(value)

    def get(self, key: str) -> bytes | None:
        path = self._file(key)
        try:
            # O_NONBLOCK: a FIFO in place of a record must not block the reader
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise StoreError(f"{self.path}: record {key!r} cannot be read ({e}).") from e
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                if stat.S_ISDIR(mode):
                    return None
                raise TraceCorruptError(
                    f"{self.path}: record {key!r} is not a regular file ({path} is a "
                    f"{_kind(mode)}); refusing to read it. Restore the trace from a copy."
                )
            with os.fdopen(fd, "rb", closefd=True) as fh:
                fd = -1
                return fh.read()
        except OSError as e:
            raise StoreError(f"{self.path}: record {key!r} cannot be read ({e}).") from e
        finally:
            if fd >= 0:
                os.close(fd)

    def keys(self, prefix: str = "") -> Iterator[str]:
        found = []
        for root, dirs, files in os.walk(self.path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(root).relative_to(self.path).parts
            base = [_unescape(p) for p in rel]
            for f in files:
                if f.startswith("."):
                    continue
                key = "/".join([*base, _unescape(f)])
                if key.startswith(prefix):
                    found.append(key)
        return iter(sorted(found))

    def commit(self) -> None:
        self._check_writable()
        order = sorted(self._staged, key=lambda k: (k == _LAST, k))
        try:
            for key in order:
                target = self._file(key)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
                try:
                    with open(tmp, "wb") as fh:
                        fh.write(self._staged[key])
                        if self.fsync:
                            fh.flush()
                            os.fsync(fh.fileno())
                    os.replace(tmp, target)
                except BaseException:
                    tmp.unlink(missing_ok=True)  # give the space back (a full disk)
                    raise
        except OSError as e:
            raise _write_error(f"writing to directory store {self.path} failed", e) from e
        finally:
            self._staged.clear()

    def nbytes(self) -> int | None:
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for f in files:
                try:
                    total += (Path(root) / f).stat().st_size
                except OSError:
                    pass
        return total

    def close(self) -> None:
        self._staged.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.path)!r}, readonly={self.readonly})"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _write_error(what: str, e: OSError) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full: {what} ({e.strerror}); free some space.")
    return StoreError(f"{what}: {e}")
