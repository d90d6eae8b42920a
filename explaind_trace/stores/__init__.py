"""Byte-level stores: the ``Store`` interface, built-in backends and the backend registry."""

from .base import Store
from .directory import DirectoryStore
from .lmdb_store import LMDBStore
from .memory import MemoryStore
from .registry import ENTRY_POINT_GROUP, available_schemes, open_store, register_store

__all__ = [
    "Store",
    "LMDBStore",
    "MemoryStore",
    "DirectoryStore",
    "open_store",
    "register_store",
    "available_schemes",
    "ENTRY_POINT_GROUP",
]
