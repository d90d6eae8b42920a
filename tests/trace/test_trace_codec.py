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
