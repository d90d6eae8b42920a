"""Tensor and record encoding: msgpack envelopes around raw little-endian tensor bytes.

A tensor is stored as ``{"dtype", "shape", "codec", "data"}``:

- ``raw``: the little-endian bytes as they are (tiny tensors);
- ``zstd``: zstandard over the raw bytes (integers, bools);
- ``zstd-shuffle``: bytes regrouped by significance (all first bytes, then all second
  bytes, ...), then zstandard; lossless, and the exponent bytes of floats compress well;
- ``bf16-zstd``: opt-in lossy mode for float gradients: rounded to bfloat16, shuffled,
  compressed; decoded back to the recorded dtype.

Decoding accepts only the dtypes in ``DTYPES`` and checks sizes; msgpack never runs code.
Decoding is bounded: a declared shape can be pinned by the caller (from the trace header)
before anything is allocated, a zstd frame must declare the size the shape implies and never
decompresses past it, and records nest at most ``MAX_DEPTH`` levels.

Records are sealed with a checksum (``pack``): ``0xC1 'X' 'D'``, an algorithm byte, the
8-byte little-endian xxh3-64 digest of the msgpack payload, then the payload. 0xC1 is never
valid msgpack, so a sealed record is never mistaken for a plain one (traces written before
checksums hold plain msgpack records, and still read). ``unpack`` verifies the digest of
every sealed record. xxh3-64 hashed 6-30 GB/s here against 0.2 GB/s for blake2b and 1 GB/s
for crc32 (bench/results/checksum.json), so sealing costs far less than the zstd encoding it
protects: recording with and without checksums was within noise.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from .errors import TraceCorruptError

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; blake2b keeps traces sealed
    xxhash = None

__all__ = [
    "DTYPES",
    "CODECS",
    "encode_tensor",
    "encode_bytes",
    "decode_tensor",
    "is_tensor_map",
    "tensor_to_bytes",
    "tensor_u8",
    "pack",
    "unpack",
    "is_sealed",
    "CHECKSUM",
    "CHECKSUMS",
    "MAX_DEPTH",
]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_FLOATS = {"float64", "float32", "float16", "bfloat16"}
CODECS = ("raw", "zstd", "zstd-shuffle", "bf16-zstd")
_RAW_BELOW = 64  # bytes; below this compression costs more than it saves
_LITTLE = sys.byteorder == "little"
_MAX_DECOMPRESSED = 1 << 36  # 64 GiB: larger than any one recorded tensor
MAX_DEPTH = 64  # nesting levels of a record (a structure tree of inputs nests a few)
_SEAL = b"\xc1XD"
_XXH3, _BLAKE2B = 1, 2
_ALGORITHMS = {_XXH3: "xxh3-64", _BLAKE2B: "blake2b-64"}
#: the checksum new records are sealed with (the trace header names it)
CHECKSUM = "xxh3-64" if xxhash is not None else "blake2b-64"
CHECKSUMS = tuple(_ALGORITHMS.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The stored name of ``dtype``; raises ``TraceCorruptError`` for unsupported dtypes."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TraceCorruptError(
            f"tensors of dtype {dtype} cannot be stored; supported dtypes: {', '.join(DTYPES)}. "
            "Cast the value to one of them before recording."
        ) from None


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a CPU tensor, in row-major order."""
    return _u8(t).tobytes()


def tensor_u8(t: torch.Tensor) -> np.ndarray:
    """``tensor_to_bytes(t)`` as a flat uint8 array; a view of ``t``'s memory where possible."""
    return _u8(t)


# dtypes numpy has, so that a contiguous CPU tensor is viewed through ``numpy()`` (one torch
# call) instead of reshaped and re-viewed by torch (several calls, which add up per record)
_NUMPY_DTYPES = frozenset(v for k, v in DTYPES.items() if k != "bfloat16")


def _u8(t: torch.Tensor) -> np.ndarray:
    if t.is_cpu and t.dtype in _NUMPY_DTYPES and t.is_contiguous():
        arr = (t.detach() if t.requires_grad else t).numpy().reshape(-1).view(np.uint8)
        size = t.element_size()
    else:
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        arr = flat.view(torch.uint8).numpy()
        size = flat.element_size()
    if not _LITTLE and size > 1:
        arr = np.ascontiguousarray(arr.reshape(-1, size)[:, ::-1]).reshape(-1)
    return arr


def _shuffle(raw: bytes | np.ndarray, itemsize: int) -> bytes | np.ndarray:
    """The bytes regrouped by significance, as bytes or a contiguous uint8 array."""
    arr = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes | bytearray) else raw
    if itemsize == 1 or arr.size == 0:
        return arr
    return np.ascontiguousarray(arr.reshape(-1, itemsize).T)


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1 or not raw:
        return raw
    arr = np.frombuffer(raw, dtype=np.uint8)
    return np.ascontiguousarray(arr.reshape(itemsize, -1).T).tobytes()


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # compressor objects are not thread-safe; keep one per thread and level
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def encode_bytes(
    raw: bytes | np.ndarray, dtype: str, shape: list[int] | tuple[int, ...], *, level: int = 1
) -> dict[str, Any]:
    """Encode raw little-endian bytes of a tensor of ``dtype``/``shape`` (lossless)."""
    itemsize = DTYPES[dtype].itemsize
    nbytes = len(raw) if isinstance(raw, bytes) else raw.size
    if nbytes < _RAW_BELOW:
        data = raw if isinstance(raw, bytes) else raw.tobytes()
        return {"dtype": dtype, "shape": list(shape), "codec": "raw", "data": data}
    if dtype in _FLOATS and itemsize > 1:
        data = _compressor(level).compress(_shuffle(raw, itemsize))
        return {"dtype": dtype, "shape": list(shape), "codec": "zstd-shuffle", "data": data}
    data = _compressor(level).compress(raw)  # bytes or a contiguous uint8 array
    return {"dtype": dtype, "shape": list(shape), "codec": "zstd", "data": data}


def encode_tensor(t: torch.Tensor, *, lossy: str | None = None, level: int = 1) -> dict[str, Any]:
    """Encode a tensor as a msgpack-ready map.

    ``lossy="bf16"`` rounds float32/float64 tensors to bfloat16 before compressing
    (opt-in; the trace metadata records it). Other dtypes are always stored losslessly.
    """
    name = dtype_name(t.dtype)
    shape = list(t.shape)
    if lossy == "bf16" and name in ("float32", "float64") and t.numel() > 0:
        raw = _u8(t.detach().to(torch.bfloat16))
        data = _compressor(level).compress(_shuffle(raw, 2))
        return {"dtype": name, "shape": shape, "codec": "bf16-zstd", "data": data}
    if lossy not in (None, "bf16"):
        raise ValueError(f"unknown lossy mode {lossy!r}; use None or 'bf16'")
    return encode_bytes(_u8(t), name, shape, level=level)


def is_tensor_map(obj: Any) -> bool:
    """Whether ``obj`` looks like an encoded tensor map."""
    return isinstance(obj, dict) and obj.keys() == {"dtype", "shape", "codec", "data"}


def _decompress(data: bytes, expected: int, where: str) -> bytes:
    """zstd-decompress ``data`` into at most ``expected`` bytes; the frame must declare
    ``expected`` (or nothing) as its size, so no hostile frame header makes a larger buffer."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared not in (-1, expected):
            raise TraceCorruptError(
                f"{where}: its compressed data declares {declared} bytes but its shape and "
                f"dtype make {expected}; the record is damaged. Restore the trace from a copy."
            )
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=max(expected, 1))
    except zstandard.ZstdError as e:
        raise TraceCorruptError(
            f"{where}: its compressed data does not decompress ({e}); the record is damaged. "
            "Restore the trace from a copy."
        ) from e


def decode_tensor(
    obj: Any,
    *,
    where: str = "a stored tensor",
    shape: tuple[int, ...] | list[int] | None = None,
    dtype: str | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Decode a tensor map; validates dtype, shape, codec and byte count before allocating.

    ``shape``/``dtype``: what the trace header says this tensor must be (checked first);
    ``max_bytes``: a bound on its decoded size when the header fixes no shape. ``where``
    names the tensor (trace, record key, field) in the error messages.
    """
    if not is_tensor_map(obj):
        raise TraceCorruptError(
            f"{where}: expected an encoded tensor map with dtype/shape/codec/data"
        )
    name, dims, codec, data = obj["dtype"], obj["shape"], obj["codec"], obj["data"]
    if not isinstance(name, str) or name not in DTYPES:
        raise TraceCorruptError(
            f"{where}: stored dtype {name!r:.40} is not allowed; allowed: {', '.join(DTYPES)}"
        )
    if (
        not isinstance(dims, list)
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in dims
        )
        or len(dims) > MAX_DEPTH
    ):
        raise TraceCorruptError(
            f"{where}: stored shape {dims!r:.80} is not a list of non-negative sizes"
        )
    if codec not in CODECS or not isinstance(data, bytes):
        raise TraceCorruptError(
            f"{where}: stored codec {codec!r:.40} is unknown or its data is not bytes"
        )
    if shape is not None and tuple(dims) != tuple(shape):
        raise TraceCorruptError(
            f"{where}: stored shape {tuple(dims)} differs from {tuple(shape)} in the trace "
            "header; the record is damaged. Restore the trace from a copy."
        )
    if dtype is not None and name != dtype:
        raise TraceCorruptError(
            f"{where}: stored dtype {name} differs from {dtype} in the trace header; the "
            "record is damaged. Restore the trace from a copy."
        )
    tdtype = DTYPES[name]
    numel = 1
    for s in dims:
        numel *= s
    expected = numel * tdtype.itemsize
    limit = _MAX_DECOMPRESSED if max_bytes is None else min(max_bytes, _MAX_DECOMPRESSED)
    if expected > limit:
        raise TraceCorruptError(
            f"{where}: stored shape {dims} of {name} would take {expected} bytes, more than "
            f"the {limit} this record can hold; the record is damaged. Restore it from a copy."
        )
    try:
        if codec == "bf16-zstd":
            if name not in ("float32", "float64"):
                raise TraceCorruptError(f"{where}: bf16-zstd data cannot hold dtype {name}")
            raw = _unshuffle(_decompress(data, numel * 2, where), 2)
            return _from_bytes(raw, torch.bfloat16, dims, numel, where).to(tdtype)
        if codec == "raw":
            raw = data
        elif codec == "zstd":
            raw = _decompress(data, expected, where)
        else:
            raw = _unshuffle(_decompress(data, expected, where), tdtype.itemsize)
        return _from_bytes(raw, tdtype, dims, numel, where)
    except MemoryError as e:
        raise TraceCorruptError(
            f"{where}: a stored tensor of shape {dims} and dtype {name} ({expected} bytes) "
            "does not fit in memory; if the trace is intact, read it on a larger machine."
        ) from e


def _from_bytes(
    raw: bytes, dtype: torch.dtype, shape: list[int], numel: int, where: str
) -> torch.Tensor:
    if len(raw) != numel * dtype.itemsize:
        raise TraceCorruptError(
            f"{where}: stored tensor has {len(raw)} bytes, expected {numel * dtype.itemsize} "
            f"for shape {shape} and dtype {dtype}; the record is damaged."
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    arr = np.frombuffer(bytearray(raw), dtype=np.uint8)
    if not _LITTLE and dtype.itemsize > 1:
        arr = np.ascontiguousarray(arr.reshape(-1, dtype.itemsize)[:, ::-1]).reshape(-1)
    return torch.from_numpy(arr).view(dtype).reshape(shape)


def _digest(alg: int, payload: bytes | memoryview) -> bytes:
    if alg == _XXH3:
        if xxhash is None:
            raise TraceCorruptError(
                "this record is sealed with xxh3-64 but the xxhash package is not installed; "
                "install it (pip install xxhash) to read the trace."
            )
        return xxhash.xxh3_64_digest(payload)[::-1]  # little-endian
    return hashlib.blake2b(payload, digest_size=8).digest()


def pack(obj: Any, *, checksum: bool = True) -> bytes:
    """msgpack-encode a record (maps, lists, str, bytes, numbers, None), sealed with a
    checksum of its bytes unless ``checksum=False``."""
    payload = msgpack.packb(obj, use_bin_type=True)
    if not checksum:
        return payload
    alg = _XXH3 if xxhash is not None else _BLAKE2B
    return b"".join((_SEAL, bytes((alg,)), _digest(alg, payload), payload))


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` is a record sealed with a checksum (see the module docstring)."""
    return data[:3] == _SEAL


def unpack(data: bytes, *, where: str = "a stored record", sealed: bool = False) -> Any:
    """Decode a record: verify its checksum when it has one, then msgpack-decode it.

    Never runs code: ext types, timestamps and nesting deeper than ``MAX_DEPTH`` are
    refused. ``sealed=True``: the trace header says every record carries a checksum, so a
    record without one is damaged. ``where`` names the trace and record key in errors.
    """
    payload: bytes | memoryview = data
    if is_sealed(data):
        if len(data) < 12 or data[3] not in _ALGORITHMS:
            raise TraceCorruptError(f"{where}: its checksum header is damaged. {_RESTORE}")
        payload = memoryview(data)[12:]
        if _digest(data[3], payload) != data[4:12]:
            raise TraceCorruptError(
                f"{where}: checksum mismatch ({_ALGORITHMS[data[3]]}): its bytes changed after "
                f"they were written. {_RESTORE}"
            )
    elif sealed:
        raise TraceCorruptError(
            f"{where}: it carries no checksum though the trace header says every record does; "
            f"its first bytes are damaged. {_RESTORE}"
        )
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_NoExt(where))
    except TraceCorruptError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise TraceCorruptError(f"{where}: it is not valid msgpack ({e}). {_RESTORE}") from e
    _check_plain(obj, where)
    return obj


_RESTORE = "Restore the trace from a copy; `explaind info --verify` lists what is intact."
_LEAVES = (str, bytes, int, float, bool, type(None))


class _NoExt:
    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, code: int, data: bytes) -> Any:
        raise TraceCorruptError(
            f"{self.where}: it holds msgpack extension type {code}, which no trace record "
            f"has. {_RESTORE}"
        )


def _check_plain(obj: Any, where: str) -> None:
    """Only maps, lists and plain leaves, at most ``MAX_DEPTH`` deep (iterative walk)."""
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            items = list(node.values()) + list(node.keys())
        elif isinstance(node, list):
            items = node
        elif isinstance(node, _LEAVES):
            continue
        else:
            raise TraceCorruptError(
                f"{where}: it holds a {type(node).__name__} value, which no trace record has. "
                f"{_RESTORE}"
            )
        if depth >= MAX_DEPTH:
            raise TraceCorruptError(
                f"{where}: it nests deeper than {MAX_DEPTH} levels, which no trace record "
                f"does. {_RESTORE}"
            )
        stack.extend((c, depth + 1) for c in items if not isinstance(c, _LEAVES))
