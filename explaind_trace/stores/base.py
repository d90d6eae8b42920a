"""The byte-level store interface every backend implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator

from ..errors import StoreError

__all__ = ["Store"]


class Store(abc.ABC):
    """A key/value store of ``str`` keys and ``bytes`` values with atomic commits.

    ``put`` stages a value; ``commit`` publishes every staged value at once; ``get`` and
    ``keys`` see committed data only. Schema, versioning and metadata live above this
    interface. A registered backend is constructed as ``cls(location, readonly=...)``
    where ``location`` is the part of the URL after ``scheme://``.
    """

    readonly: bool = False

    @abc.abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Stage ``value`` under ``key`` until the next ``commit``."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The committed value of ``key``, or ``None``."""

    @abc.abstractmethod
    def keys(self, prefix: str = "") -> Iterator[str]:
        """Committed keys starting with ``prefix``, sorted."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Atomically publish all staged puts."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store; staged, uncommitted puts are dropped."""

    def nbytes(self) -> int | None:
        """Bytes the store occupies on disk, when the backend knows it."""
        return None

    def _check_writable(self) -> None:
        if self.readonly:
            raise StoreError(
                f"{type(self).__name__} was opened read-only and cannot be written; "
                "open it with readonly=False to write."
            )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
