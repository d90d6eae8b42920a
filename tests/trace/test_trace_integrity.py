"""Checksummed records, decoding bounded by the trace header, and the model-class check."""

from __future__ import annotations

import pytest
import torch
import zstandard
from torch import nn

import explaind_trace as et
from explaind_trace import codec
from explaind_trace.errors import TraceCorruptError, TraceMismatchError
from explaind_trace.info import describe
from explaind_trace.stores import MemoryStore
from tests.trace import trace_helpers as th


def _trace(**options) -> str:
    name = th.unique("integrity")
    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = th.data()
    with et.record(model, opt, store=f"memory://{name}", checkpoint_every=3, **options):
        th.train(model, opt, None, x, y, steps=5)
    return name


def _rewrite(name: str, key: str, change) -> None:
    store = MemoryStore(name)
    store.put(key, change(store.get(key)))
    store.commit()


def test_every_record_is_sealed_and_the_header_says_so() -> None:
    name = _trace()
    store = MemoryStore(name)
    keys = list(store.keys())
    assert {"meta", "progress", "final"} <= set(keys) and len(keys) > 10
    assert all(codec.is_sealed(store.get(k)) for k in keys)
    with et.open_trace(f"memory://{name}") as trace:
        assert trace.meta.checksum == "xxh3-64" and trace.meta.options.checksums
        assert trace.check_drift().exact


def test_without_checksums_records_are_plain_and_read_the_same() -> None:
    sealed, plain = _trace(), _trace(checksums=False)
    store = MemoryStore(plain)
    assert not any(codec.is_sealed(store.get(k)) for k in store.keys())
    with et.open_trace(f"memory://{sealed}") as a, et.open_trace(f"memory://{plain}") as b:
        assert b.meta.checksum is None
        for t in range(5):
            ga, gb = a.step(t).grads, b.step(t).grads
            assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_a_flipped_byte_is_caught_naming_the_trace_and_the_key() -> None:
    name = _trace()

    def flip(raw: bytes) -> bytes:
        b = bytearray(raw)
        b[len(b) // 2] ^= 0x10
        return bytes(b)

    _rewrite(name, "step/00000002", flip)
    with et.open_trace(f"memory://{name}") as trace:
        trace.step(1)
        with pytest.raises(
            TraceCorruptError, match=rf"memory://{name}: record 'step/00000002'.*checksum mismatch"
        ):
            trace.step(2)
    # a record stripped of its seal, in a trace whose header says every record has one
    _rewrite(name, "step/00000003", lambda raw: raw[12:])
    with et.open_trace(f"memory://{name}") as trace:
        with pytest.raises(TraceCorruptError, match=r"'step/00000003'.*carries no checksum"):
            trace.step(3)


def _hostile(name: str, key: str, change) -> None:
    """Rewrite record ``key`` with a valid checksum: the decoder's own bounds must hold."""
    _rewrite(name, key, lambda raw: codec.pack(change(_named_grads(name, codec.unpack(raw)))))


def _named_grads(name: str, rec):
    """A step record with its packed gradients (schema 2) as the per-parameter map that
    older traces and mixed-dtype gradients store, which the hostile edits below change."""
    grads = rec.get("grads") if isinstance(rec, dict) else None
    if not isinstance(grads, dict) or grads.get("packed") != 1:
        return rec
    with et.open_trace(f"memory://{name}") as trace:
        named = trace.bounds.grads(grads, "grads")
    rec["grads"] = {n: codec.encode_tensor(g.clone()) for n, g in named.items()}
    return rec


def test_declared_shapes_are_checked_against_the_header_before_decompressing() -> None:
    name = _trace()
    inflating = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))  # 1 GiB of zeros

    def huge_grad(rec):
        rec["grads"]["fc1.weight"] = {
            "dtype": "float32", "shape": [1 << 28], "codec": "zstd-shuffle", "data": inflating,
        }  # fmt: skip
        return rec

    _hostile(name, "step/00000001", huge_grad)
    with et.open_trace(f"memory://{name}") as trace:
        with pytest.raises(
            TraceCorruptError,
            match=r"'step/00000001', grads, 'fc1.weight': stored shape \(268435456,\) differs from \(16, 6\)",
        ):
            trace.step(1)
        with pytest.raises(TraceCorruptError, match="step/00000001"):
            trace.check_drift()


def test_bad_hyperparameters_and_unknown_tensors_are_trace_errors() -> None:
    name = _trace()

    def bad_lr(rec):
        # schema 2 stores what differs from the header's hyperparameters, older traces all
        rec["group_changes" if "group_changes" in rec else "groups"][0]["lr"] = "fast"
        return rec

    def stray(rec):
        rec["grads"]["not.a.param"] = rec["grads"]["fc1.bias"]
        return rec

    _hostile(name, "step/00000001", bad_lr)
    _hostile(name, "step/00000002", stray)
    with et.open_trace(f"memory://{name}") as trace:
        with pytest.raises(TraceCorruptError, match=r"hyperparameter 'lr' of group 0 is 'fast'"):
            trace.step_update(1)
        with pytest.raises(TraceCorruptError, match="'not.a.param' is not a parameter"):
            trace.step(2)


def test_progress_and_first_checkpoint_are_checked_at_open() -> None:
    name = _trace()
    _hostile(name, "progress", lambda p: {**p, "steps": "five"})
    with pytest.raises(TraceCorruptError, match="record 'progress' is malformed"):
        et.open_trace(f"memory://{name}")
    name = _trace()
    MemoryStore(name)._data.pop("ckpt/00000000")
    with pytest.raises(TraceCorruptError, match=r"record 'ckpt/00000000' \(the state every replay"):
        et.open_trace(f"memory://{name}")
    # a missing progress record does not make a trace with steps look empty
    name = _trace()
    MemoryStore(name)._data.pop("progress")
    with pytest.raises(TraceCorruptError, match="record 'progress' is missing but step records"):
        et.open_trace(f"memory://{name}")


def test_check_model_compares_the_recorded_class() -> None:
    name = _trace()

    class Sub(th.MLP):  # a subclass of the recorded class is the recorded architecture
        pass

    class Other(nn.Module):  # same names and shapes, another class
        def __init__(self) -> None:
            super().__init__()
            ref = th.MLP()
            self.fc1, self.bn, self.drop, self.fc2 = ref.fc1, ref.bn, ref.drop, ref.fc2

    with et.open_trace(f"memory://{name}") as trace:
        trace.check_model(th.MLP())
        trace.check_model(Sub())
        with pytest.raises(
            TraceMismatchError,
            match=r"the model is a .*Other, the trace was recorded from a tests.trace.trace_helpers.MLP",
        ):
            trace.check_model(Other())
        trace.check_model(Other(), model_class=False)
        with pytest.raises(TraceMismatchError, match="is a str, not a torch.nn.Module"):
            trace.check_model("model.pt")  # type: ignore[arg-type]


def test_describe_leaves_the_callers_store_open(tmp_path) -> None:
    from explaind_trace.stores import LMDBStore

    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    with et.record(model, opt, store=tmp_path / "d.lmdb"):
        th.train(model, opt, None, x, y, steps=2)
    store = LMDBStore(tmp_path / "d.lmdb", readonly=True)
    assert describe(store, check_drift=False)["steps"] == 2
    assert describe(store, check_drift=False)["steps"] == 2  # still open: it is the caller's
    assert store.get("meta") is not None
    store.close()
