"""Where a key's leaf node and overflow pages sit in a small data.mdb, found by walking the
B-tree from the newest meta page (LMDB 0.9, 64-bit little-endian; see mdb.c). Written for
the fault probes independently of ``explaind_trace.stores.lmdb_pages``, which it tests."""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    key: str
    offset: int  # of the node's header (mn_lo, mn_hi, mn_flags, mn_ksize) in the file
    size: int  # mn_lo | mn_hi << 16: the value's size
    overflow: int | None  # first overflow page of a large value (F_BIGDATA), else None


def leaf_nodes(data: bytes, psize: int) -> dict[str, Node]:
    """Every leaf node of the main database of the committed transaction, by key."""
    metas = []
    for m in (0, 1):
        at = m * psize + 16  # the page header, then MDB_meta
        root, txnid = struct.unpack_from("<Q8xQ", data, at + 112)
        metas.append((txnid, root))
    _txnid, root = max(metas)
    out: dict[str, Node] = {}
    todo = [root]
    while todo:
        page = todo.pop()
        base = page * psize
        _pgno, _pad, flags, lower, _upper = struct.unpack_from("<QHHHH", data, base)
        for i in range((lower - 16) // 2):
            (ptr,) = struct.unpack_from("<H", data, base + 16 + 2 * i)
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", data, base + ptr)
            if flags & 0x01:  # branch: the child's page number
                todo.append(lo | hi << 16 | nflags << 32)
                continue
            key = data[base + ptr + 8 : base + ptr + 8 + ksize].decode()
            big = None
            if nflags & 0x01:
                (big,) = struct.unpack_from("<Q", data, base + ptr + 8 + ksize)
            out[key] = Node(key, base + ptr, lo | hi << 16, big)
    return out


def set_size(raw: bytearray, node: Node, size: int) -> None:
    """Write ``size`` into the node's mn_lo/mn_hi."""
    struct.pack_into("<HH", raw, node.offset, size & 0xFFFF, size >> 16)


def set_overflow_pages(raw: bytearray, node: Node, psize: int, pages: int) -> None:
    """Write ``pages`` into the mp_pages field of the node's first overflow page."""
    assert node.overflow is not None
    struct.pack_into("<I", raw, node.overflow * psize + 12, pages)


def overflow_pages(raw: bytes, node: Node, psize: int) -> int:
    assert node.overflow is not None
    return struct.unpack_from("<I", raw, node.overflow * psize + 12)[0]
