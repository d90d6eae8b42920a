"""The stored input rows of a trace: a bounded cache of decoded rows and the user-id index.

Each distinct sample is stored once under ``sample/{content id}`` (see ``steps.py``); a
forward names its rows by content id, and by user id too when ``set_sample_ids`` was used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from . import codec
from .errors import TraceCorruptError
from .schema import sample_key
from .steps import content_ids, decode_sample
from .stores import Store

if TYPE_CHECKING:
    from .bounds import HeaderBounds

__all__ = ["SampleCache", "SampleRows"]

SAMPLE_CACHE_BYTES = 256 << 20


class SampleCache:
    """LRU of decoded sample rows, bounded by bytes (thread-safe)."""

    def __init__(self, limit: int = SAMPLE_CACHE_BYTES) -> None:
        self.lock = threading.Lock()
        self.limit = limit
        self.size = 0
        self.items: OrderedDict[str, list[torch.Tensor]] = OrderedDict()

    def get(self, key: str) -> list[torch.Tensor] | None:
        with self.lock:
            rows = self.items.get(key)
            if rows is not None:
                self.items.move_to_end(key)
            return rows

    def put(self, key: str, rows: list[torch.Tensor]) -> None:
        n = sum(r.numel() * r.element_size() for r in rows)
        with self.lock:
            if key in self.items:
                return
            self.items[key] = rows
            self.size += n
            while self.size > self.limit and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.size -= sum(r.numel() * r.element_size() for r in old)


class SampleRows:
    """The samples of one store: rows by content id, and content ids by user id.

    ``forwards()`` iterates the stored forward maps of every step (for the user-id index,
    built on first use).
    """

    def __init__(
        self,
        store: Store,
        forwards: Callable[[], Iterable[dict[str, Any]]],
        *,
        name: str,
        sealed: bool = False,
        bounds: HeaderBounds | None = None,
    ) -> None:
        self._store = store
        self._sealed = sealed
        self._bounds = bounds
        self._forwards = forwards
        self.name = name
        self.cache = SampleCache()
        self._user_ids: dict[str, str] | None = None

    def rows(self, cid: str) -> list[torch.Tensor]:
        """The decoded rows of the sample with content id ``cid`` (cached; do not modify)."""
        rows = self.cache.get(cid)
        if rows is None:
            key = sample_key(cid)
            raw = self._store.get(key)
            where = f"{self.name}: record {key!r}"
            if raw is None:
                raise TraceCorruptError(
                    f"{where} is missing; restore the trace from a copy, or use the steps "
                    "before the first forward that needs it."
                )
            rows = decode_sample(
                codec.unpack(raw, where=where, sealed=self._sealed), where, self._bounds
            )
            self.cache.put(cid, rows)
        return rows

    def content_id(self, sample_id: str) -> str | None:
        """The content id of ``sample_id`` (a content id or a user id); None if unknown."""
        if self._store.get(sample_key(sample_id)) is not None:
            return sample_id
        if self._user_ids is None:
            self._user_ids = self._index_user_ids()
        return self._user_ids.get(sample_id)

    def _index_user_ids(self) -> dict[str, str]:
        """user id -> content id of its first recorded row (one scan of the step records)."""
        index: dict[str, str] = {}
        for f in self._forwards():
            if f.get("ids") is not None:
                for uid, cid in zip(f["ids"], content_ids(f, self.name)):
                    index.setdefault(uid, cid)
        return index
