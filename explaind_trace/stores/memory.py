"""In-process store: ``memory://name`` names a process-global dictionary."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ..errors import StoreError
from .base import Store
from .registry import register_store

__all__ = ["MemoryStore"]

_STORES: dict[str, dict[str, bytes]] = {}
_lock = threading.Lock()


@register_store("memory")
class MemoryStore(Store):
    """A named in-memory store; a reader opened later in the same process sees the data."""

    def __init__(self, name: str = "", *, readonly: bool = False) -> None:
        self.name = name
        self.readonly = readonly
        self._staged: dict[str, bytes] = {}
        with _lock:
            if readonly and name not in _STORES:
                raise StoreError(f"no in-memory store named {name!r} exists in this process.")
            self._data = _STORES.setdefault(name, {})

    def put(self, key: str, value: bytes) -> None:
        self._check_writable()
        self._staged[key] = bytes(value)

    def get(self, key: str) -> bytes | None:
        with _lock:
            return self._data.get(key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        with _lock:
            found = [k for k in self._data if k.startswith(prefix)]
        return iter(sorted(found))

    def commit(self) -> None:
        self._check_writable()
        with _lock:
            self._data.update(self._staged)
        self._staged.clear()

    def nbytes(self) -> int | None:
        with _lock:
            return sum(len(k) + len(v) for k, v in self._data.items())

    def close(self) -> None:
        self._staged.clear()

    @staticmethod
    def drop(name: str) -> None:
        """Forget the in-memory store ``name`` and free its data."""
        with _lock:
            _STORES.pop(name, None)

    def __repr__(self) -> str:
        return f"MemoryStore({self.name!r}, readonly={self.readonly})"
