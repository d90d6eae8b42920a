"""Directory store: ``dir://path``, one file per key.

A commit writes every value to a temporary file and moves it into place with
``os.replace``; the ``progress`` key is moved last, so a crash in the middle of a commit
leaves files the trace's progress record does not yet cover, and readers ignore them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

from ..errors import NotATraceError, StoreError
from .base import Store
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
            if any(self.path.iterdir()) and not marker.is_file():
                raise NotATraceError(
                    f"{self.path} is a non-empty directory that is not an ExPLAIND store; it was "
                    "left untouched. Choose a new path (or an empty directory) for the trace."
                )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            marker.write_text("explaind directory store v1\n")
        except OSError as e:
            raise StoreError(f"cannot create directory store at {self.path}: {e}") from e

    def _file(self, key: str) -> Path:
        return self.path.joinpath(*(_escape(s) for s in key.split("/")))

    def put(self, key: str, value: bytes) -> None:
        self._check_writable()
        self._file(key)  # validates the key early
        self._staged[key] = bytes(value)

    def get(self, key: str) -> bytes | None:
        try:
            return self._file(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

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
                with open(tmp, "wb") as fh:
                    fh.write(self._staged[key])
                    if self.fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, target)
        except OSError as e:
            raise StoreError(f"writing to directory store {self.path} failed: {e}") from e
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

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.path)!r}, readonly={self.readonly})"
