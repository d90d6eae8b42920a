"""A storage backend of your own: one SQLite file per trace, with the standard library only.

ExPLAIND writes traces through a tiny byte-level interface (`explaind_trace.Store`):
``put`` stages a value, ``commit`` publishes everything staged at once, ``get``/``keys`` see
committed data only. Registering the class under a scheme makes ``sqlite://path`` usable
wherever a trace location is accepted (``record(store=...)``, ``open_trace``, the CLI).

The recorder writes from a background thread and the kernel engine reads ahead in one, so
the connection is shared between threads behind a lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import explaind_trace
from explaind_trace import Store, StoreError

__all__ = ["SQLiteStore"]


@explaind_trace.register_store("sqlite")
class SQLiteStore(Store):
    """``sqlite://path/to/trace.sqlite``: keys and values in one table of one SQLite file."""

    def __init__(self, location: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(location)
        self.readonly = readonly
        self._staged: dict[str, bytes] = {}
        self._lock = threading.Lock()
        if readonly and not self.path.is_file():
            raise StoreError(f"no SQLite trace at {self.path}: the file does not exist.")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"{self.path.resolve().as_uri()}?mode={'ro' if readonly else 'rwc'}"
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            if not readonly:
                self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB)")
                self._db.commit()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from e

    def put(self, key: str, value: bytes) -> None:
        self._check_writable()
        self._staged[key] = bytes(value)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def keys(self, prefix: str = "") -> Iterator[str]:
        # BINARY collation compares UTF-8 bytes, which sorts like Python sorts str
        query = "SELECT key FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key"
        with self._lock:
            rows = self._db.execute(query, (len(prefix), prefix)).fetchall()
        return iter([r[0] for r in rows])

    def commit(self) -> None:
        self._check_writable()
        staged, self._staged = self._staged, {}
        try:
            with self._lock, self._db:  # one transaction: all staged values or none
                self._db.executemany(
                    "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", staged.items()
                )
        except sqlite3.Error as e:
            raise StoreError(f"committing to SQLite store {self.path} failed: {e}") from e

    def close(self) -> None:
        self._staged.clear()
        with self._lock:
            self._db.close()

    def nbytes(self) -> int | None:
        return self.path.stat().st_size if self.path.exists() else None
