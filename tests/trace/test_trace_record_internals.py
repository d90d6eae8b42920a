"""The recorder's fast paths give what the plain computations give: row ids, buffer snapshots,
mode overrides, packed copies, tensor bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from explaind_trace import codec, encoder
from explaind_trace.encoder import GilPacer
from explaind_trace.modules import BufferTracker, ModuleIndex
from explaind_trace.packing import PackedTensors, copy_named
from explaind_trace.rowids import RowIds

KEY = hashlib.blake2b(b"header", digest_size=32).digest()


def _plain_ids(rows: np.ndarray) -> list[str]:
    return [hashlib.blake2b(r.tobytes(), digest_size=16, key=KEY).hexdigest() for r in rows]


def _rows(n: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, width), dtype=np.uint8)


@pytest.mark.parametrize("width", [0, 1, 24, 64, 65, 12288])
def test_row_ids_equal_hashing_every_row(width: int) -> None:
    ids = RowIds()
    pool = _rows(40, width, 0)
    rng = np.random.default_rng(1)
    for _ in range(6):  # batches that repeat rows, within and across batches
        batch = pool[rng.integers(0, len(pool), 70)]
        assert ids.ids(KEY, batch, lambda: None) == _plain_ids(batch)


def test_row_ids_check_every_byte_not_the_fingerprint() -> None:
    ids = RowIds()
    a = _rows(1, 4096, 2)
    ids.ids(KEY, a, lambda: None)
    # differs from a only where the fingerprint does not look, one byte at a time
    cols = set(ids._fingerprint_columns(4096).tolist())
    for pos in [p for p in (1, 2047, 4093) if p not in cols]:
        b = a.copy()
        b[0, pos] ^= 1
        assert ids.ids(KEY, b, lambda: None) == _plain_ids(b)
    assert ids.ids(KEY, a, lambda: None) == _plain_ids(a)


def test_row_ids_budget_bounds_the_cache() -> None:
    ids = RowIds(budget=3 * (4096 + 400))
    batch = _rows(10, 4096, 3)
    assert ids.ids(KEY, batch, lambda: None) == _plain_ids(batch)
    assert 0 < ids.used <= ids.budget
    assert ids.ids(KEY, batch, lambda: None) == _plain_ids(batch)  # partly cached
    none = RowIds(budget=0)
    assert none.ids(KEY, batch, lambda: None) == _plain_ids(batch)
    assert none.used == 0


def test_row_ids_keep_keys_apart() -> None:
    ids = RowIds()
    batch = _rows(4, 100, 4)
    other = hashlib.blake2b(b"other", digest_size=32).digest()
    ids.ids(KEY, batch, lambda: None)
    want = [hashlib.blake2b(r.tobytes(), digest_size=16, key=other).hexdigest() for r in batch]
    assert ids.ids(other, batch, lambda: None) == want


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.bn(self.fc(x)))


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def _same(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_module_index_follows_the_module_tree() -> None:
    net = Net()
    index = ModuleIndex(net)
    assert index.modules() == list(net.named_modules())
    net.block[1].eval()
    assert index.mode_overrides() == {"block.1": False}
    net.block.append(nn.BatchNorm1d(4))  # a new submodule
    net.shared = net.bn  # the same module twice: listed once, as named_modules() does
    assert index.modules() == list(net.named_modules())
    assert index.named_buffers() == list(net.named_buffers())
    net.eval()
    net.block[0].train()
    assert index.mode_overrides() == {"block.0": True}


def test_buffer_tracker_snapshots_what_the_buffers_hold() -> None:
    net = Net()
    tracker = BufferTracker(ModuleIndex(net))
    first = tracker.snapshot_if_changed("forward")
    assert first is not None and _same(first, _buffers(net))
    assert tracker.snapshot_if_changed("forward") is None
    step = tracker.snapshot_if_changed("step")
    assert step is first  # one copy shared while unchanged
    net(torch.randn(5, 3))  # batch norm updates its buffers in place
    fwd = tracker.snapshot_if_changed("forward")
    assert fwd is not None and _same(fwd, _buffers(net))
    assert _same(first, _buffers(Net()))  # the earlier copy is untouched
    net.bn.running_mean = torch.full((4,), 7.0)  # replaced
    net.register_buffer("extra", torch.arange(3))  # added
    now = tracker.snapshot()
    assert _same(now, _buffers(net))
    assert tracker.snapshot_if_changed("step") is now
    net.extra.add_(1)
    assert _same(tracker.snapshot_if_changed("step"), _buffers(net))


def test_copy_named_packs_copies() -> None:
    a = torch.randn(2, 3)
    b = torch.arange(5)  # another dtype: its own flat tensor
    c = torch.randn(4, 3).t()  # not contiguous
    d = torch.tensor(2.5)  # 0-dim
    e = torch.zeros(0, 3)
    named = [("a", a), ("b", b), ("c", c), ("d", d), ("e", e)]
    packed = copy_named(named)
    assert isinstance(packed, PackedTensors)
    assert list(packed) == ["a", "b", "c", "d", "e"]
    for name, t in named:
        assert packed[name].shape == t.shape and packed[name].dtype == t.dtype
        assert torch.equal(packed[name], t)
    for name, dtype, shape, raw in packed.byte_items():
        assert dtype == packed[name].dtype and shape == packed[name].shape
        assert raw.tobytes() == codec.tensor_to_bytes(dict(named)[name])
    lone = torch.arange(4)
    single = copy_named([("x", lone)])
    lone.add_(10)  # a copy, not a view of the input
    assert torch.equal(single["x"], torch.arange(4))
    a.add_(1)
    assert not torch.equal(packed["a"], a)


@pytest.mark.parametrize(
    "t",
    [
        torch.randn(3, 4),
        torch.randn(3, 4).t(),
        torch.randn(3, 4, dtype=torch.bfloat16),
        torch.tensor(1.5),
        torch.tensor([True, False]),
        torch.zeros(0, 2),
        torch.randn(2, 2, requires_grad=True),
        torch.arange(10, dtype=torch.int16)[::3],
    ],
)
def test_tensor_bytes_fast_path(t: torch.Tensor) -> None:
    flat = t.detach().contiguous().reshape(-1)
    want = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    assert codec.tensor_to_bytes(t) == want
    assert codec.tensor_u8(t).tobytes() == want


def test_gil_pacer_hands_off_only_after_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(encoder, "yield_gil", lambda: calls.append(1))
    pacer = GilPacer(interval=3600.0)
    for _ in range(100):
        pacer()
    assert calls == []
    pacer.interval = 0.0
    pacer()
    assert calls == [1]
