"""Content ids of sample rows: a keyed blake2b per row, not recomputed for rows seen before.

Hashing every row of every batch was about half of the trace writer's CPU time on image
batches (a 3x32x32 float row is 12 KiB), and the same samples come back every epoch. Rows
already hashed are kept with their ids, up to a memory budget (64 MiB by default; rows
seen after it is spent are hashed every time); a row is looked up by a fingerprint (a few
of its bytes; for rows of at most 64 bytes, the whole row) and takes a cached id only when
its bytes equal the cached row's. An id is thus always the hash of exactly the row's
bytes, as if it had been computed again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import cast

import numpy as np

__all__ = ["RowIds", "ID_BYTES"]

ID_BYTES = 16  # digest bytes of a content id (its hex string has twice as many characters)

_WHOLE_ROW = 64  # rows up to this many bytes are their own fingerprint
_SAMPLES = 16  # otherwise: this many 4-byte pieces, evenly spaced over the row
_ENTRY_OVERHEAD = 160  # rough bytes of Python objects per cached row (dict slot, str, bytes)
_CHUNK = 64  # rows compared or hashed between GIL hand-offs


class RowIds:
    """Row content ids (hex of a 16-byte keyed blake2b), with a bounded cache of rows seen."""

    def __init__(self, budget: int = 64 << 20) -> None:
        self.budget = budget
        self.used = 0
        # per blake2b key (the slots' dtypes and row shapes): for short rows, row -> id; for
        # longer ones, fingerprint -> [(row, id)]
        self._whole: dict[bytes, dict[bytes, str]] = {}
        self._sampled: dict[bytes, dict[bytes, list[tuple[bytes, str]]]] = {}
        self._columns: dict[int, np.ndarray] = {}

    def ids(self, key: bytes, rows: np.ndarray, pace: Callable[[], None]) -> list[str]:
        """Ids of the rows of ``rows`` (uint8, one row per sample), hashed with ``key``."""
        rows = np.ascontiguousarray(rows)
        fingerprints = self._fingerprints(rows)
        if rows.shape[1] <= _WHOLE_ROW:
            whole = self._whole.setdefault(key, {})
            found: list[str | None] = list(map(whole.get, fingerprints))
        else:
            sampled = self._sampled.setdefault(key, {})
            found = []
            for start in range(0, len(fingerprints), _CHUNK):
                chunk = enumerate(fingerprints[start : start + _CHUNK], start)
                found += [self._match(sampled.get(fp), rows[i]) for i, fp in chunk]
                pace()
        missing = [i for i, cid in enumerate(found) if cid is None]
        for start in range(0, len(missing), _CHUNK):
            pace()
            chunk = missing[start : start + _CHUNK]
            # blake2b releases the GIL while hashing a row of 2 KiB or more
            hashed = [
                hashlib.blake2b(rows[i], digest_size=ID_BYTES, key=key).hexdigest() for i in chunk
            ]
            for i, cid in zip(chunk, hashed):
                found[i] = cid
                self._remember(key, fingerprints[i], rows[i], cid)
        return cast(list[str], found)  # every row has its id now

    @staticmethod
    def _match(entries: list[tuple[bytes, str]] | None, row: np.ndarray) -> str | None:
        if entries is None:
            return None
        raw = row.tobytes()
        for cached, cid in entries:
            if cached == raw:
                return cid
        return None

    def _fingerprint_columns(self, width: int) -> np.ndarray:
        """The byte positions a row of ``width`` > 64 bytes is fingerprinted by."""
        cols = self._columns.get(width)
        if cols is None:
            starts = np.linspace(0, width - 4, _SAMPLES).astype(np.int64)
            cols = self._columns[width] = (starts[:, None] + np.arange(4)).ravel()
        return cols

    def _fingerprints(self, rows: np.ndarray) -> list[bytes]:
        n, width = rows.shape
        if width > _WHOLE_ROW:
            rows = np.ascontiguousarray(rows[:, self._fingerprint_columns(width)])
            width = rows.shape[1]
        if width == 0:
            return [b""] * n
        return rows.view(np.dtype((np.void, width))).ravel().tolist()

    def _remember(self, key: bytes, fp: bytes, row: np.ndarray, cid: str) -> None:
        if row.nbytes <= _WHOLE_ROW:
            cost = len(fp) + _ENTRY_OVERHEAD
            if self.used + cost <= self.budget and fp not in self._whole[key]:
                self._whole[key][fp] = cid
                self.used += cost
            return
        cost = len(fp) + row.nbytes + _ENTRY_OVERHEAD
        if self.used + cost > self.budget:
            return
        entries = self._sampled[key].setdefault(fp, [])
        if all(c != cid for _, c in entries):  # not the same row twice in one batch
            entries.append((row.tobytes(), cid))
            self.used += cost
