"""Tensor codec: lossless round trips, the opt-in bf16 mode, and strict decoding."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from explaind_trace import codec
from explaind_trace.errors import TraceCorruptError

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.uint8,
    torch.bool,
]
shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4)


def _tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** torch.randint(
            -30, 30, shape, generator=g
        )
        t = t.to(dtype)
        if t.numel() > 2:  # the specials must survive too
            t.view(-1)[:3] = torch.tensor([float("nan"), float("-inf"), -0.0], dtype=dtype)
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES), shape=shapes, seed=st.integers(0, 2**31), packed=st.booleans()
)
def test_roundtrip_is_bitwise(
    dtype: torch.dtype, shape: list[int], seed: int, packed: bool
) -> None:
    t = _tensor(dtype, shape, seed)
    if t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous input
    enc = codec.encode_tensor(t)
    if packed:
        enc = codec.unpack(codec.pack(enc))
    out = codec.decode_tensor(enc)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(_bits(out), _bits(t.contiguous()))


def test_large_tensors_are_compressed_with_shuffle() -> None:
    t = torch.randn(4096)
    enc = codec.encode_tensor(t)
    assert enc["codec"] == "zstd-shuffle" and len(enc["data"]) < t.numel() * 4
    assert codec.encode_tensor(torch.arange(4096))["codec"] == "zstd"
    assert codec.encode_tensor(torch.tensor(1.5))["codec"] == "raw"


def test_bf16_mode_is_lossy_and_marked() -> None:
    t = torch.randn(300, dtype=torch.float64)
    enc = codec.encode_tensor(t, lossy="bf16")
    assert enc["codec"] == "bf16-zstd" and enc["dtype"] == "float64"
    out = codec.decode_tensor(enc)
    assert out.dtype == torch.float64 and torch.equal(out, t.bfloat16().double())
    assert (
        codec.encode_tensor(torch.arange(300), lossy="bf16")["codec"] == "zstd"
    )  # ints stay exact


def test_decode_rejects_bad_records() -> None:
    good = codec.encode_tensor(torch.randn(100))
    with pytest.raises(TraceCorruptError, match="not allowed"):
        codec.decode_tensor({**good, "dtype": "object"})
    with pytest.raises(TraceCorruptError, match="bytes"):
        codec.decode_tensor({**good, "shape": [101]})
    with pytest.raises(TraceCorruptError, match="codec"):
        codec.decode_tensor({**good, "codec": "pickle"})
    with pytest.raises(TraceCorruptError, match="non-negative"):
        codec.decode_tensor({**good, "shape": [-1]})
    with pytest.raises(TraceCorruptError, match="decompress"):
        codec.decode_tensor({**good, "data": b"garbage" * 10})
    with pytest.raises(TraceCorruptError, match="msgpack"):
        codec.unpack(b"\xc1")
    with pytest.raises(TraceCorruptError, match="cannot be stored"):
        codec.encode_tensor(torch.zeros(2, dtype=torch.complex64))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), data=st.data())
def test_every_byte_flip_of_a_sealed_record_is_detected(seed: int, data) -> None:
    record = {"grads": {"w": codec.encode_tensor(_tensor(torch.float32, [5, 7], seed))}, "i": 3}
    sealed = codec.pack(record)
    assert codec.is_sealed(sealed) and codec.unpack(sealed, sealed=True) == record
    pos = data.draw(st.integers(0, len(sealed) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(sealed)
    damaged[pos] ^= 1 << bit
    with pytest.raises(TraceCorruptError, match="step/00000003"):
        codec.unpack(bytes(damaged), where="t.lmdb: record 'step/00000003'", sealed=True)


def test_plain_records_of_older_traces_still_read_and_a_stripped_seal_is_caught() -> None:
    record = {"a": [1, 2.5, "x", b"y", None]}
    plain = codec.pack(record, checksum=False)
    assert not codec.is_sealed(plain) and codec.unpack(plain) == record
    with pytest.raises(TraceCorruptError, match="carries no checksum though the trace header"):
        codec.unpack(plain, sealed=True)
    sealed = codec.pack(record)
    with pytest.raises(TraceCorruptError, match="checksum header is damaged"):
        codec.unpack(sealed[:3] + b"\x09" + sealed[4:])


def test_hostile_msgpack_is_a_trace_error() -> None:
    import msgpack

    deep: object = 1
    for _ in range(500):
        deep = [deep]
    hostile = {
        "list key": b"\x81\x91\x01\x02",  # {[1]: 2}: unhashable in Python
        "ext type": msgpack.packb({"x": msgpack.ExtType(7, b"\x80\x04K\x01.")}),
        "timestamp": msgpack.packb({"t": msgpack.Timestamp(1, 2)}),
        "500 deep": msgpack.packb(deep),
        "truncated": msgpack.packb({"a": b"x" * 100})[:50],
        "extra data": msgpack.packb({}) + b"\x00",
    }
    for name, raw in hostile.items():
        for sealed in (False, True):
            value = raw
            if sealed:  # a valid checksum over hostile bytes: the decoder's bounds must hold
                value = codec._SEAL + bytes((1,)) + codec._digest(1, raw) + raw
            with pytest.raises(TraceCorruptError, match="rec 'x'"):
                codec.unpack(value, where=f"rec 'x' ({name})")


def test_decoding_is_bounded_by_the_declared_and_the_header_size() -> None:
    import zstandard

    # 32 KB of zstd that inflates to 1 GiB, declared as 2**28 float32 values
    big = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))
    assert len(big) < 64 << 10
    hostile = {"dtype": "float32", "shape": [1 << 28], "codec": "zstd-shuffle", "data": big}
    with pytest.raises(
        TraceCorruptError, match=r"stored shape \(268435456,\) differs from \(16, 6\)"
    ):
        codec.decode_tensor(hostile, shape=(16, 6), dtype="float32", where="grad 'w'")
    with pytest.raises(TraceCorruptError, match="more than the 1048576 this record can hold"):
        codec.decode_tensor(hostile, max_bytes=1 << 20)
    # a frame whose header declares more than the shape allows is refused before decompressing
    small = {"dtype": "float32", "shape": [4], "codec": "zstd", "data": big}
    with pytest.raises(TraceCorruptError, match="declares 1073741824 bytes but its shape"):
        codec.decode_tensor(small)
    good = codec.encode_tensor(torch.arange(64.0))
    with pytest.raises(TraceCorruptError, match="stored dtype float32 differs from float64"):
        codec.decode_tensor(good, dtype="float64")
