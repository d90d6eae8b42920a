"""The trace format: RecordOptions in the header, older headers, one state record, and
``buffers_at`` reading each segment once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import explaind_trace as et
from explaind_trace import codec
from explaind_trace.schema import META
from explaind_trace.stores import MemoryStore

from . import trace_helpers as th


def _run(
    store, steps: int = 6, train_every: int = 3, **options
) -> dict[int, dict[str, torch.Tensor]]:
    """Record a BN model whose forwards run in train mode (changing the buffers) only every
    ``train_every``-th step; returns the live buffers when each step ran (after its forwards)."""
    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = th.data()
    seen = {}
    with et.record(model, opt, store=store, **options):
        for t in range(steps):
            idx = torch.arange(8 * t, 8 * t + 8) % x.shape[0]
            opt.zero_grad()
            if t % train_every != 1:  # an eval-mode forward leaves the buffers as they were
                model.eval()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            model.train()
            seen[t] = {n: b.detach().clone() for n, b in model.named_buffers()}
            opt.step()
    seen[steps] = {n: b.detach().clone() for n, b in model.named_buffers()}
    return seen


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("checkpoint_every", 0, ValueError),
        ("checkpoint_every", True, ValueError),
        ("output", "", ValueError),
        ("progress", "yes", TypeError),
        ("grad_codec", "zip", ValueError),
        ("compression_level", 23, ValueError),
        ("queue_size", 0, ValueError),
        ("max_pending_forwards", -1, ValueError),
    ],
)
def test_record_options_name_the_bad_field(field: str, value, error: type) -> None:
    with pytest.raises(error, match=field):
        et.RecordOptions(**{field: value})
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=field):  # the same check from record()'s keywords
        et.Recorder(model, opt, store="memory://never", **{field: value})


def test_options_or_keywords_not_both() -> None:
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="options= was given together with .*checkpoint_every"):
        et.Recorder(model, opt, options=et.RecordOptions(), checkpoint_every=3)
    with pytest.raises(TypeError, match="unknown recording option.*checkpoint_evry"):
        et.Recorder(model, opt, checkpoint_evry=3)
    with pytest.raises(TypeError, match="options must be a RecordOptions"):
        et.Recorder(model, opt, options={"checkpoint_every": 3})


def test_options_are_saved_in_the_header() -> None:
    opts = et.RecordOptions(checkpoint_every=4, compression_level=3, max_pending_forwards=9)
    store = MemoryStore(th.unique("format"))
    _run(store, options=opts)
    reader = et.TraceReader(store)
    assert reader.meta.options == opts
    assert reader.meta.checkpoint_every == 4 and reader.checkpoint_steps == [0, 4]
    # keywords build the same options
    store2 = MemoryStore(th.unique("format"))
    _run(store2, checkpoint_every=4, compression_level=3, max_pending_forwards=9)
    assert et.TraceReader(store2).meta.options == opts


def test_a_header_written_before_the_options_still_reads() -> None:
    store = MemoryStore(th.unique("format"))
    _run(store, checkpoint_every=2, grad_codec="bf16", compression_level=5)
    raw = codec.unpack(store.get(META))
    del raw["options"]  # what the first version of the format wrote
    store.put(META, codec.pack(raw))
    store.commit()
    reader = et.TraceReader(store)
    want = et.RecordOptions(checkpoint_every=2, grad_codec="bf16", compression_level=5)
    assert reader.meta.options == want
    assert reader.num_steps == 6 and reader.check_drift().checkpoints


def test_a_header_from_a_newer_writer_keeps_the_options_it_knows() -> None:
    store = MemoryStore(th.unique("format"))
    _run(store, checkpoint_every=3)
    raw = codec.unpack(store.get(META))
    raw["options"]["an_option_from_the_future"] = 1
    store.put(META, codec.pack(raw))
    store.commit()
    assert et.TraceReader(store).meta.options == et.RecordOptions(checkpoint_every=3)


def test_one_state_record_for_checkpoints_and_the_final_state() -> None:
    store = MemoryStore(th.unique("format"))
    _run(store, checkpoint_every=3)
    reader = et.TraceReader(store)
    ckpt, final = reader.checkpoint(3), reader.final()
    assert type(ckpt) is type(final) is et.Checkpoint
    assert final.step == reader.num_steps and ckpt.step == 3
    assert dataclasses.fields(et.Checkpoint) and set(final.params) == set(reader.param_names)


class _CountingStore(MemoryStore):
    """Counts reads per key prefix."""

    def __init__(self, inner: MemoryStore) -> None:
        super().__init__(th.unique("counting"))
        self.inner = inner
        self.reads: dict[str, int] = {}

    def get(self, key: str) -> bytes | None:
        prefix = key.split("/", 1)[0]
        self.reads[prefix] = self.reads.get(prefix, 0) + 1
        return self.inner.get(key)

    def keys(self, prefix: str = ""):
        return self.inner.keys(prefix)


def test_buffers_at_reads_each_segment_once() -> None:
    inner = MemoryStore(th.unique("format"))
    steps, every = 12, 4
    live = _run(inner, steps=steps, train_every=6, checkpoint_every=every)
    store = _CountingStore(inner)
    reader = et.TraceReader(store)
    store.reads.clear()
    # the kernel's order: backward over the steps
    got = {t: reader.buffers_at(t) for t in reversed(range(steps + 1))}
    for t in range(steps + 1):  # the buffers the model held when step t ran (after its forwards)
        assert set(got[t]) == set(live[t])
        for n in live[t]:
            assert torch.equal(got[t][n], live[t][n]), (t, n)
    # one read per step record and one per checkpoint (its buffers), not per (step, step back)
    assert store.reads.get("step", 0) <= steps
    assert store.reads.get("ckpt", 0) <= steps // every
    assert store.reads.get("final", 0) == 1
    # asking again within the segment read last and its neighbour reads nothing
    store.reads.clear()
    for t in range(2 * every):
        reader.buffers_at(t)
    assert store.reads == {}
    # the returned buffers are the caller's own: changing them changes no later answer
    reader.buffers_at(9)["bn.running_mean"].add_(1.0)
    assert torch.equal(reader.buffers_at(9)["bn.running_mean"], live[9]["bn.running_mean"])


def test_buffers_at_in_the_kernels_order_reads_each_step_once() -> None:
    """The kernel's prefetcher asks, per segment last-first, for the step before the segment
    and then for every step of it."""
    inner = MemoryStore(th.unique("format"))
    steps, every = 12, 4
    live = _run(inner, steps=steps, train_every=6, checkpoint_every=every)
    store = _CountingStore(inner)
    reader = et.TraceReader(store)
    store.reads.clear()
    for a, b in reversed(reader.segments()):
        if a > 0:
            before = reader.buffers_at(a - 1)
            assert all(torch.equal(before[n], live[a - 1][n]) for n in live[a - 1])
        for t in range(a, b):
            got = reader.buffers_at(t)
            assert all(torch.equal(got[n], live[t][n]) for n in live[t])
    assert store.reads.get("step", 0) == steps
    assert store.reads.get("ckpt", 0) <= steps // every  # only its buffers, once per segment
