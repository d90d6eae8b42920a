"""Tensor and record encoding: msgpack envelopes around raw little-endian tensor bytes.

A tensor is stored as ``{"dtype", "shape", "codec", "data"}``:

- ``raw``: the little-endian bytes as they are (tiny tensors);
- ``zstd``: zstandard over the raw bytes (integers, bools);
- ``zstd-shuffle``: bytes regrouped by significance (all first bytes, then all second
  bytes, ...), then zstandard; lossless, and the exponent bytes of floats compress well;
- ``bf16-zstd``: opt-in lossy mode for float gradients: rounded to bfloat16, shuffled,
  compressed; decoded back to the recorded dtype.

Decoding accepts only the dtypes in ``DTYPES`` and checks sizes; msgpack never runs code.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from .errors import TraceCorruptError

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
_MAX_DECOMPRESSED = 1 << 40


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


def _decompress(data: bytes, expected: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(expected, 1))
    except zstandard.ZstdError as e:
        raise TraceCorruptError(f"a compressed tensor does not decompress: {e}") from e
    return out


def decode_tensor(obj: Any) -> torch.Tensor:
    """Decode a tensor map; validates dtype, shape, codec and byte count."""
    if not is_tensor_map(obj):
        raise TraceCorruptError("expected an encoded tensor map with dtype/shape/codec/data")
    dtype, shape, codec, data = obj["dtype"], obj["shape"], obj["codec"], obj["data"]
    if dtype not in DTYPES:
        raise TraceCorruptError(
            f"stored dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise TraceCorruptError(f"stored shape {shape!r} is not a list of non-negative ints")
    if codec not in CODECS or not isinstance(data, bytes):
        raise TraceCorruptError(f"stored codec {codec!r} is unknown or its data is not bytes")
    tdtype = DTYPES[dtype]
    numel = 1
    for s in shape:
        numel *= s
    if codec == "bf16-zstd":
        if dtype not in ("float32", "float64"):
            raise TraceCorruptError(f"bf16-zstd data cannot hold dtype {dtype}")
        raw = _unshuffle(_decompress(data, numel * 2), 2)
        return _from_bytes(raw, torch.bfloat16, shape, numel).to(tdtype)
    expected = numel * tdtype.itemsize
    if expected > _MAX_DECOMPRESSED:
        raise TraceCorruptError(f"stored tensor of shape {shape} is implausibly large")
    if codec == "raw":
        raw = data
    elif codec == "zstd":
        raw = _decompress(data, expected)
    else:
        raw = _unshuffle(_decompress(data, expected), tdtype.itemsize)
    return _from_bytes(raw, tdtype, shape, numel)


def _from_bytes(raw: bytes, dtype: torch.dtype, shape: list[int], numel: int) -> torch.Tensor:
    if len(raw) != numel * dtype.itemsize:
        raise TraceCorruptError(
            f"stored tensor has {len(raw)} bytes, expected {numel * dtype.itemsize} "
            f"for shape {shape} and dtype {dtype}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    arr = np.frombuffer(bytearray(raw), dtype=np.uint8)
    if not _LITTLE and dtype.itemsize > 1:
        arr = np.ascontiguousarray(arr.reshape(-1, dtype.itemsize)[:, ::-1]).reshape(-1)
    return torch.from_numpy(arr).view(dtype).reshape(shape)


def pack(obj: Any) -> bytes:
    """msgpack-encode a record (maps, lists, str, bytes, numbers, None)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """msgpack-decode a record; never runs code, rejects malformed input."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise TraceCorruptError(f"a stored record is not valid msgpack: {e}") from e
