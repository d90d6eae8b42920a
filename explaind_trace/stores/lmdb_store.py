"""LMDB store (the default): one directory, one atomic write transaction per commit."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb

from ..errors import NotATraceError, StoreError
from .base import Store
from .registry import register_store

__all__ = ["LMDBStore"]

_DEFAULT_MAP_SIZE = 64 << 20
_MAX_MAP_SIZE = 1 << 46
_MAX_KEY = 511

# LMDB must not open one environment twice in a process: writers are exclusive, readers
# of one path share a single read-only environment (reference counted).
_open_writers: set[str] = set()
_readers: dict[str, list] = {}  # resolved path -> [environment, open count]
_open_lock = threading.Lock()


@register_store("lmdb")
class LMDBStore(Store):
    """An LMDB environment in directory ``path``.

    Commits are not fsync'ed one by one (``sync=False``), which keeps them durable against
    a killed process (the data sits in the OS page cache) but not against a power cut
    until ``close`` syncs. The memory map starts at ``map_size`` bytes and doubles
    whenever a transaction does not fit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        map_size: int = _DEFAULT_MAP_SIZE,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._staged: dict[str, bytes] = {}
        self._key = str(self.path.resolve())
        if readonly:
            self._env = self._open_readonly()
        else:
            self._env = self._open_writable(map_size)

    def _open_readonly(self) -> lmdb.Environment:
        if not self.path.exists():
            raise StoreError(f"no trace at {self.path}: the path does not exist.")
        if not (self.path / "data.mdb").is_file():
            raise NotATraceError(
                f"{self.path} exists but is not an LMDB trace directory (no data.mdb inside)."
            )
        with _open_lock:
            if self._key in _open_writers:
                raise StoreError(
                    f"{self.path} is being recorded by this process; LMDB cannot open it twice "
                    "in one process. Close the recorder before reading the trace."
                )
            entry = _readers.get(self._key)
            if entry is not None:
                entry[1] += 1
                return entry[0]
            try:
                env = lmdb.open(str(self.path), subdir=True, readonly=True, lock=True, max_dbs=0)
            except lmdb.Error:
                # read-only media: no lock file can be created; read without locking
                try:
                    env = lmdb.open(str(self.path), subdir=True, readonly=True, lock=False)
                except lmdb.Error as e:
                    raise NotATraceError(f"{self.path} is not a readable LMDB trace: {e}") from e
            _readers[self._key] = [env, 1]
            return env

    def _open_writable(self, map_size: int) -> lmdb.Environment:
        if self.path.exists():
            if not self.path.is_dir():
                raise NotATraceError(
                    f"{self.path} exists and is a file, not a trace directory; it was left "
                    "untouched. Choose another path for the trace."
                )
            entries = {p.name for p in self.path.iterdir()}
            if entries and "data.mdb" not in entries:
                raise NotATraceError(
                    f"{self.path} is a non-empty directory that is not an LMDB trace; it was "
                    "left untouched. Choose a new path (or an empty directory) for the trace."
                )
        with _open_lock:
            if self._key in _open_writers or self._key in _readers:
                raise StoreError(f"{self.path} is already open in this process; close it first.")
            _open_writers.add(self._key)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            return lmdb.open(
                str(self.path),
                subdir=True,
                map_size=int(map_size),
                sync=False,
                metasync=False,
                readahead=False,
                max_dbs=0,
            )
        except (lmdb.Error, OSError) as e:
            with _open_lock:
                _open_writers.discard(self._key)
            raise StoreError(f"cannot open LMDB store at {self.path}: {e}") from e

    def put(self, key: str, value: bytes) -> None:
        self._check_writable()
        if len(key.encode()) > _MAX_KEY:
            raise StoreError(f"key {key[:60]!r}... is longer than LMDB's {_MAX_KEY}-byte limit")
        self._staged[key] = bytes(value)

    def _read(self, fn):  # retries once when another process grew the map
        try:
            with self._env.begin(buffers=False) as txn:
                return fn(txn)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
            with self._env.begin(buffers=False) as txn:
                return fn(txn)

    def get(self, key: str) -> bytes | None:
        return self._read(lambda txn: txn.get(key.encode()))

    def keys(self, prefix: str = "") -> Iterator[str]:
        raw = prefix.encode()

        def collect(txn: lmdb.Transaction) -> list[str]:
            out = []
            cur = txn.cursor()
            if not cur.set_range(raw):
                return out
            for k in cur.iternext(keys=True, values=False):
                if not k.startswith(raw):
                    break
                out.append(k.decode())
            return out

        return iter(self._read(collect))

    def commit(self) -> None:
        self._check_writable()
        if not self._staged:
            return
        items = sorted(self._staged.items())
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in items:
                        txn.put(k.encode(), v)
                break
            except lmdb.MapFullError:
                size = self._env.info()["map_size"]
                if size * 2 > _MAX_MAP_SIZE:
                    raise StoreError(
                        f"LMDB map at {self.path} cannot grow past {size} bytes"
                    ) from None
                self._env.set_mapsize(size * 2)
        self._staged.clear()

    @property
    def map_size(self) -> int:
        """The current size of the memory map in bytes."""
        return int(self._env.info()["map_size"])

    def nbytes(self) -> int | None:
        data = self.path / "data.mdb"
        try:
            st = data.stat()
        except OSError:
            return None
        blocks = getattr(st, "st_blocks", None)
        return int(blocks * 512) if blocks is not None else int(st.st_size)

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is None:
            return
        self._staged.clear()
        self._env = None
        if self.readonly:
            with _open_lock:
                entry = _readers[self._key]
                entry[1] -= 1
                if entry[1] == 0:
                    del _readers[self._key]
                    env.close()
            return
        try:
            env.sync(True)
        finally:
            env.close()
            with _open_lock:
                _open_writers.discard(self._key)

    def __repr__(self) -> str:
        return f"LMDBStore({str(self.path)!r}, readonly={self.readonly})"
