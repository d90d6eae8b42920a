"""A value's node in data.mdb, checked with ordinary file reads before LMDB reads it.

LMDB takes a value's size from its leaf node and, for a value larger than about half a
page, its bytes from overflow pages, and checks neither; py-lmdb then touches every page
of the value. A damaged size (or overflow page) makes that run past the end of data.mdb
(SIGBUS) or allocate gigabytes. ``NodeCheck.check`` walks the B-tree to the key's node
with ``os.pread`` (never the memory map), the way LMDB's own lookup goes, and refuses a
node whose value would leave its leaf page or the file, or whose overflow page announces
fewer pages than the value's size needs or more than the file holds (more than needed
is legal: LMDB keeps a larger run when a value shrinks within one transaction). Pages read are kept for one
transaction id: a finished trace is walked once.

Layout of LMDB 0.9 on a 64-bit little-endian machine (``mdb.c``): a page is a 16-byte
header ``mp_pgno: u64, mp_pad: u16, mp_flags: u16, mp_lower, mp_upper: u16`` (an overflow
page: ``mp_pages: u32`` in place of lower/upper), then ``mp_lower - 16`` bytes of u16 node
offsets. A node is ``mn_lo, mn_hi, mn_flags, mn_ksize: u16``, its key, then its data: a
branch node's child page is ``lo | hi << 16 | flags << 32``; a leaf's data size is
``lo | hi << 16``, and with ``F_BIGDATA`` its data is the u64 number of the first overflow
page, whose header is followed by the value.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..errors import TraceCorruptError

__all__ = ["NodeCheck"]

_PAGE = struct.Struct("<QHHHH")  # mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper
_OVERFLOW = struct.Struct("<QHHI")  # mp_pgno, mp_pad, mp_flags, mp_pages
_NODE = struct.Struct("<HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize
_META_AT = 16  # the MDB_meta of a meta page follows its page header
_META = struct.Struct("<I4x16x48x40xQQQ")  # magic, main db's md_root, last_pg, txnid
_MAGIC = 0xBEEFC0DE
_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA = 0x01
_NO_PAGE = (1 << 64) - 1
_MAX_DEPTH = 32
_MAX_CACHED = 512  # pages kept per transaction id


class _Damaged(Exception):
    """An inconsistency found in data.mdb (the message says where)."""


class NodeCheck:
    """Checks, before a read, that the node of a key in ``path/data.mdb`` is whole."""

    def __init__(self, path: Path, psize: int) -> None:
        self.path = path
        self.data = path / "data.mdb"
        self.psize = psize
        self._txnid = -1
        self._pages: dict[int, bytes] = {}

    def check(self, key: str, txnid: int) -> None:
        """Raise ``TraceCorruptError`` naming ``key`` when reading it in the transaction
        ``txnid`` would read outside its page or the file; nothing else is read."""
        try:
            with open(self.data, "rb") as fh:
                self._check(fh.fileno(), key.encode(), txnid)
        except _Damaged as e:
            raise TraceCorruptError(
                f"{self.path}: record {key!r} is damaged in the LMDB file: {e}. Restore the "
                "trace from a copy; `explaind info --verify` lists what is intact."
            ) from None
        except OSError as e:
            raise TraceCorruptError(f"{self.path}: cannot read record {key!r}: {e}") from e

    def _check(self, fd: int, key: bytes, txnid: int) -> None:
        root, last = self._root(fd, txnid)
        if root is None:
            return  # a writer committed twice since this transaction began: LMDB checks only
        if txnid != self._txnid:
            size = os.fstat(fd).st_size
            if size < (last + 1) * self.psize:
                raise _Damaged(f"the file ({size} bytes) is shorter than its {last + 1} pages")
            self._txnid, self._pages = txnid, {}
        psize, page = self.psize, root
        for _ in range(_MAX_DEPTH):
            if page > last:
                raise _Damaged(f"a branch refers to page {page} past the last page {last}")
            raw = self._page(fd, page)
            pgno, _pad, flags, lower, upper = _PAGE.unpack_from(raw)
            count = (lower - _PAGE.size) // 2
            if pgno != page or not _PAGE.size <= lower <= upper <= psize or count <= 0:
                raise _Damaged(f"the header of page {page} is not a B-tree page's")
            offsets = struct.unpack_from(f"<{count}H", raw, _PAGE.size)
            if flags & _P_BRANCH:
                page = self._child(raw, offsets, key, page)
            elif flags & _P_LEAF:
                self._leaf(fd, raw, offsets, key, page, last)
                return
            else:
                raise _Damaged(f"page {page} on the way to it is neither a branch nor a leaf")
        raise _Damaged(f"the B-tree is deeper than {_MAX_DEPTH} levels (a loop)")

    def _root(self, fd: int, txnid: int) -> tuple[int | None, int]:
        for m in (0, 1):
            raw = os.pread(fd, _META_AT + _META.size, m * self.psize)
            if len(raw) < _META_AT + _META.size:
                raise _Damaged("a meta page is cut short")
            magic, root, last, meta_txnid = _META.unpack_from(raw, _META_AT)
            if magic == _MAGIC and meta_txnid == txnid:
                return (None if root == _NO_PAGE else root), last
        return None, 0

    def _page(self, fd: int, page: int) -> bytes:
        raw = self._pages.get(page)
        if raw is None:
            raw = os.pread(fd, self.psize, page * self.psize)
            if len(raw) < self.psize:
                raise _Damaged(f"page {page} lies past the end of the file")
            if len(self._pages) >= _MAX_CACHED:
                self._pages.clear()
            self._pages[page] = raw
        return raw

    def _node(self, raw: bytes, at: int, page: int) -> tuple[int, int, int, bytes, int]:
        """(lo, hi, flags, key, offset of the data) of the node at offset ``at``."""
        if not _PAGE.size <= at <= self.psize - _NODE.size:
            raise _Damaged(f"a node offset of page {page} points outside it")
        lo, hi, flags, ksize = _NODE.unpack_from(raw, at)
        start = at + _NODE.size
        if start + ksize > self.psize:
            raise _Damaged(f"a key of page {page} runs past the page")
        return lo, hi, flags, raw[start : start + ksize], start + ksize

    def _child(self, raw: bytes, offsets: tuple[int, ...], key: bytes, page: int) -> int:
        """The child of a branch page whose range holds ``key`` (node 0's key is empty)."""
        lo_i, hi_i = 0, len(offsets) - 1
        while lo_i < hi_i:  # the last node whose key is <= key
            mid = (lo_i + hi_i + 1) // 2
            if self._node(raw, offsets[mid], page)[3] <= key:
                lo_i = mid
            else:
                hi_i = mid - 1
        lo, hi, flags, _k, _at = self._node(raw, offsets[lo_i], page)
        return lo | hi << 16 | flags << 32

    def _leaf(
        self, fd: int, raw: bytes, offsets: tuple[int, ...], key: bytes, page: int, last: int
    ) -> None:
        lo_i, hi_i = 0, len(offsets) - 1
        while lo_i <= hi_i:
            mid = (lo_i + hi_i) // 2
            lo, hi, flags, k, at = self._node(raw, offsets[mid], page)
            if k < key:
                lo_i = mid + 1
            elif k > key:
                hi_i = mid - 1
            else:
                break
        else:
            return  # not in the tree: LMDB finds nothing either
        size = lo | hi << 16
        if not flags & _F_BIGDATA:
            if at + size > self.psize:
                raise _Damaged(f"its size ({size} bytes) runs past the leaf page {page}")
            return
        if at + 8 > self.psize:
            raise _Damaged(f"its overflow page number runs past the leaf page {page}")
        (first,) = struct.unpack_from("<Q", raw, at)
        need = -(-(_OVERFLOW.size + size) // self.psize)
        if first + need > last + 1:
            raise _Damaged(
                f"its size ({size} bytes) needs {need} overflow page(s) from page {first}, "
                f"past the last page {last}"
            )
        head = os.pread(fd, _OVERFLOW.size, first * self.psize)
        if len(head) < _OVERFLOW.size:
            raise _Damaged(f"its overflow page {first} lies past the end of the file")
        pgno, _pad, oflags, pages = _OVERFLOW.unpack(head)
        if pgno != first or not oflags & _P_OVERFLOW:
            raise _Damaged(f"page {first}, where its bytes should start, is not an overflow page")
        if pages < need or first + pages > last + 1:
            raise _Damaged(
                f"its overflow page {first} announces {pages} page(s) but its size "
                f"({size} bytes) needs {need}"
                + ("" if pages < need else f" and the file ends at page {last}")
            )
