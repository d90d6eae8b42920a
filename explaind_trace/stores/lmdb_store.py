"""LMDB store (the default): one directory, one atomic write transaction per commit.

LMDB memory-maps its files, so a file that is shorter than its own header says (a
truncated copy, a full disk) would kill the process with SIGBUS on the first read of a
missing page. Before anything is mapped, the store reads the environment's two meta pages
with ordinary file reads and checks that data.mdb holds every page the newest meta page
refers to; it refuses a lock file it could not allocate (full disk) and opens read-only
without one instead; and it checks free space before a writable open. Every value read
is located in the file's pages with ordinary reads before LMDB reads it (``lmdb_pages.py``),
since LMDB trusts the sizes it finds in its pages.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb

from ..errors import DiskFullError, NotATraceError, StoreError, TraceCorruptError
from .base import Store
from .lmdb_pages import NodeCheck
from .locking import LOCK_NAME, WriterLock
from .registry import register_store

__all__ = ["LMDBStore", "check_lmdb_file", "free_bytes"]

logger = logging.getLogger(__name__)

_DEFAULT_MAP_SIZE = 64 << 20
_MIN_MAP_SIZE = 1 << 16
_MAX_MAP_SIZE = 1 << 46
_MAX_KEY = 511
# free space a new environment needs: lock file (8 KiB + reader slots), two meta pages and
# the first commits; below it LMDB's own writes into its memory-mapped lock file fault
_MIN_FREE = 1 << 20

# LMDB 0.9 on a 64-bit little-endian machine: a page header of 16 bytes, then MDB_meta
_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16
_META = struct.Struct(
    "<II8xQI44x48xQQ"
)  # magic, version, mapsize, psize (free db md_pad), last_pg, txnid


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes available to this user on the filesystem holding ``path`` (or its nearest
    existing parent); ``None`` when the system cannot tell."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def _is_disk_full(e: BaseException, path: Path) -> bool:
    """Whether an LMDB/OS error is (most likely) a full filesystem: ENOSPC/EDQUOT, or an
    I/O error while less than a megabyte is free (LMDB reports some ENOSPC as EIO)."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    if "no space left" in text or "quota" in text:
        return True
    if code == errno.EIO or "input/output error" in text or isinstance(e, lmdb.DiskError):
        free = free_bytes(path)
        return free is not None and free < _MIN_FREE
    return False


def check_lmdb_file(path: str | os.PathLike[str]) -> int:
    """Check ``path/data.mdb`` against its own meta pages before it is memory-mapped.

    Returns the page size. Raises ``TraceCorruptError`` (naming the file and what to do)
    when the file is shorter than the pages its newest meta page refers to, or when neither
    meta page is a valid LMDB meta page — the cases where mapping it would end in SIGBUS.
    """
    data = Path(path) / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "rb") as fh:
            first = fh.read(_PAGE_HEADER + _META.size)
            metas = [_parse_meta(first)]
            psize = metas[0][2] if metas[0] is not None else 4096
            if 0 < psize <= 1 << 16:
                fh.seek(psize)
                metas.append(_parse_meta(fh.read(_PAGE_HEADER + _META.size)))
    except OSError as e:
        raise StoreError(f"cannot read the LMDB trace at {path}: {e}") from e
    valid = [m for m in metas if m is not None]
    what = "Restore the trace from a complete copy, or record it again."
    if not valid:
        raise TraceCorruptError(
            f"{data} is not a valid LMDB environment (no valid meta page, {size} bytes): the "
            f"file is truncated or damaged. {what}"
        )
    _txnid, last_pg, psize = max(valid)
    need = (last_pg + 1) * psize
    if size < need:
        raise TraceCorruptError(
            f"{data} is truncated: it has {size} bytes but its header refers to {last_pg + 1} "
            f"pages of {psize} bytes ({need} bytes); reading it would fault. {what}"
        )
    return psize


def _parse_meta(raw: bytes) -> tuple[int, int, int] | None:
    """(txnid, last page, page size) of one meta page, or None when it is not one."""
    if len(raw) < _PAGE_HEADER + _META.size:
        return None
    magic, version, _mapsize, psize, last_pg, txnid = _META.unpack_from(raw, _PAGE_HEADER)
    if magic != _MAGIC or version != 1:
        return None
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    return txnid, last_pg, psize


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
        self._lock: WriterLock | None = None
        if not readonly and (
            isinstance(map_size, bool)
            or not isinstance(map_size, int)
            or not _MIN_MAP_SIZE <= map_size <= _MAX_MAP_SIZE
        ):
            raise StoreError(
                f"map_size={map_size!r} is not a valid LMDB map size; give an int between "
                f"{_MIN_MAP_SIZE} and {_MAX_MAP_SIZE} bytes (the map grows as needed)."
            )
        if readonly:
            self._env = self._open_readonly()
        else:
            self._env = self._open_writable(map_size)
        self._nodes = NodeCheck(self.path, self._env.stat()["psize"])

    def _open_readonly(self) -> lmdb.Environment:
        if not self.path.exists():
            raise StoreError(f"no trace at {self.path}: the path does not exist.")
        if not (self.path / "data.mdb").is_file():
            raise NotATraceError(
                f"{self.path} exists but is not an LMDB trace directory (no data.mdb inside)."
            )
        # first the cheap in-process check: this process's own recorder may be writing the
        # file, and reading its meta pages mid-write could call it truncated
        self._refuse_own_writer()
        check_lmdb_file(self.path)
        with _open_lock:
            self._refuse_own_writer()
            entry = _readers.get(self._key)
            if entry is not None:
                entry[1] += 1
                return entry[0]
            env = None
            if self._lock_usable():
                try:
                    env = lmdb.open(
                        str(self.path), subdir=True, readonly=True, lock=True, max_dbs=0
                    )
                except lmdb.Error:
                    env = None  # read-only media: no lock file can be created
            if env is None:
                # no writer holds this trace open (it would have made the lock file), or
                # the lock file cannot be written: read without LMDB's reader table
                try:
                    env = lmdb.open(str(self.path), subdir=True, readonly=True, lock=False)
                except lmdb.Error as e:
                    raise NotATraceError(f"{self.path} is not a readable LMDB trace: {e}") from e
            _readers[self._key] = [env, 1]
            return env

    def _refuse_own_writer(self) -> None:
        """StoreError when this process is recording into this path (call under _open_lock,
        or before it as a fast first check)."""
        if self._key in _open_writers:
            raise StoreError(
                f"{self.path} is being recorded by this process; LMDB cannot open it twice "
                "in one process. Close the recorder before reading the trace."
            )

    def _refuse_open_here(self) -> None:
        """StoreError when this process has this path open at all (under _open_lock)."""
        if self._key in _open_writers or self._key in _readers:
            raise StoreError(f"{self.path} is already open in this process; close it first.")

    def _lock_usable(self) -> bool:
        """Whether LMDB can map lock.mdb without faulting: it exists and is fully
        allocated, or there is room to allocate it. A missing lock file means no writer
        has the trace open (a writer creates it), so reading without one is safe."""
        lock = self.path / "lock.mdb"
        try:
            st = lock.stat()
        except OSError:
            return False
        if not os.access(lock, os.W_OK):
            return False
        allocated = getattr(st, "st_blocks", None)
        if allocated is not None and allocated * 512 >= st.st_size:
            return True
        free = free_bytes(self.path)
        if free is not None and free < st.st_size + _MIN_FREE:
            logger.info("%s: the disk is full; reading without LMDB's lock file", self.path)
            return False
        return True

    def _open_writable(self, map_size: int) -> lmdb.Environment:
        if self.path.exists():
            if not self.path.is_dir():
                raise NotATraceError(
                    f"{self.path} exists and is a file, not a trace directory; it was left "
                    "untouched. Choose another path for the trace."
                )
            entries = {p.name for p in self.path.iterdir()} - {LOCK_NAME}
            if entries and "data.mdb" not in entries:
                raise NotATraceError(
                    f"{self.path} is a non-empty directory that is not an LMDB trace; it was "
                    "left untouched. Choose a new path (or an empty directory) for the trace."
                )
            if entries:
                with _open_lock:  # open here already: say so, before reading its pages
                    self._refuse_open_here()
                check_lmdb_file(self.path)
        free = free_bytes(self.path)
        if free is not None and free < _MIN_FREE:
            raise DiskFullError(
                f"disk full: cannot record into {self.path} ({free} bytes free on its "
                f"filesystem, LMDB needs at least {_MIN_FREE}); free some space or choose "
                "another location, and record again."
            )
        with _open_lock:
            self._refuse_open_here()
            _open_writers.add(self._key)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = WriterLock(self.path)
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
            self._unlock()
            if _is_disk_full(e, self.path):
                raise DiskFullError(
                    f"disk full: cannot record into {self.path} ({e}); free some space or "
                    "choose another location, and record again."
                ) from e
            raise StoreError(f"cannot open LMDB store at {self.path}: {e}") from e
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        with _open_lock:
            _open_writers.discard(self._key)

    def put(self, key: str, value: bytes) -> None:
        self._check_writable()
        if len(key.encode()) > _MAX_KEY:
            raise StoreError(f"key {key[:60]!r}... is longer than LMDB's {_MAX_KEY}-byte limit")
        self._staged[key] = bytes(value)

    def _read(self, fn, what: str = "its keys"):  # retries once when another process grew the map
        try:
            try:
                with self._env.begin(buffers=False) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
                with self._env.begin(buffers=False) as txn:
                    return fn(txn)
        except lmdb.Error as e:  # a damaged page: LMDB's own checks refuse it
            raise TraceCorruptError(
                f"{self.path}: reading {what} failed ({type(e).__name__}: {e}); the LMDB file "
                "is damaged. Restore the trace from a copy."
            ) from e

    def get(self, key: str) -> bytes | None:
        def read(txn: lmdb.Transaction) -> bytes | None:
            self._nodes.check(key, txn.id())  # before LMDB believes the sizes in its pages
            return txn.get(key.encode())

        return self._read(read, f"record {key!r}")

    def keys(self, prefix: str = "") -> Iterator[str]:
        raw = prefix.encode()
        out: list[str] = []

        def collect(txn: lmdb.Transaction) -> list[str]:
            out.clear()
            cur = txn.cursor()
            if not cur.set_range(raw):
                return out
            for k in cur.iternext(keys=True, values=False):
                if not k.startswith(raw):
                    break
                out.append(k.decode())
            return out

        try:
            return iter(self._read(collect))
        except TraceCorruptError as e:  # name where the listing stopped
            after = f"after record {out[-1]!r}" if out else f"at the first record ({prefix!r})"
            raise TraceCorruptError(f"{e} (the listing stopped {after})") from e

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
            except lmdb.Error as e:
                self._staged.clear()
                if _is_disk_full(e, self.path):
                    raise DiskFullError(
                        f"disk full: writing to {self.path} failed ({e}); free some space or "
                        "choose another location."
                    ) from e
                raise StoreError(f"writing to LMDB store {self.path} failed: {e}") from e
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
        failure: lmdb.Error | None = None
        try:
            env.sync(True)
        except lmdb.Error as e:
            failure = e
        finally:
            env.close()
            self._unlock()
        if failure is not None:
            cls = DiskFullError if _is_disk_full(failure, self.path) else StoreError
            word = "disk full: " if cls is DiskFullError else ""
            raise cls(
                f"{word}syncing {self.path} to disk failed ({failure}); committed steps are "
                "readable until the machine restarts. Copy the trace elsewhere to keep it."
            ) from failure

    def __repr__(self) -> str:
        return f"LMDBStore({str(self.path)!r}, readonly={self.readonly})"
