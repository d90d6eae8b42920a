"""Schema version 2's compact step records read back exactly: RNG states against a base,
packed fingerprints, row ids as digests, hyperparameters as changes to the header's."""

from __future__ import annotations

import msgpack
import pytest
import torch
from torch import nn

import explaind_trace as et
from explaind_trace import codec, fingerprint
from explaind_trace.errors import TraceCorruptError
from explaind_trace.info import verify_trace
from explaind_trace.stores.memory import MemoryStore
from tests.trace import trace_helpers as th

STEPS = 6
REGENERATE = 3  # before this step's forward, a large draw regenerates the generator's words


def _record(store: str) -> list[torch.Tensor]:
    """SGD on an MLP with dropout over 8 x 16 activations (a few draws per forward); the
    CPU RNG state before each step's forward."""
    torch.manual_seed(0)
    model = th.MLP(bn=False, p=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = th.data()
    states = []
    with et.record(model, opt, store=store, checkpoint_every=4):
        for step in range(STEPS):
            if step == REGENERATE:
                torch.rand(5000)
            states.append(torch.get_rng_state())
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[8 * step : 8 * step + 8]), y[:8]).backward()
            opt.step()
            sched.step()
    return states


def _stored_rng(trace: et.TraceReader) -> list[dict]:
    return [trace._raw_step(t)["forwards"][0]["rng_state"] for t in range(STEPS)]


def test_rng_states_against_a_base_read_back_bit_for_bit() -> None:
    name = th.unique("rng")
    states = _record(f"memory://{name}")
    with et.open_trace(f"memory://{name}") as trace:
        for t in range(STEPS):
            assert torch.equal(trace.step(t).forwards[0].rng_state, states[t])
        stored = _stored_rng(trace)
        bases = sorted(trace.store.keys("rng/"))
    deltas = [s for s in stored if not codec.is_tensor_map(s)]
    # whole at the start and after the regeneration, else (mostly) against the state before
    assert codec.is_tensor_map(stored[0]) and codec.is_tensor_map(stored[REGENERATE])
    assert len(deltas) >= 2 and all("xor" in s for s in deltas)  # each forward drew a few
    assert bases == [f"rng/{n:08d}" for n in sorted({s["base"] for s in deltas})]
    assert max(len(msgpack.packb(s)) for s in deltas) < 120 < 2000 < len(msgpack.packb(stored[0]))


def test_a_damaged_or_missing_base_rng_state_names_its_record() -> None:
    name = th.unique("rng")
    _record(f"memory://{name}")
    with et.open_trace(f"memory://{name}") as trace:
        first = next(t for t, s in enumerate(_stored_rng(trace)) if s.get("base") == 0)
    data = MemoryStore(name)._data
    short = {"dtype": "uint8", "shape": [3], "codec": "raw", "data": b"abc"}
    data["rng/00000000"] = codec.pack({"state": short})
    with et.open_trace(f"memory://{name}") as trace:
        trace.step(first - 1)
        with pytest.raises(
            TraceCorruptError, match=r"difference has 5056 bytes, its base rng/0+ 3"
        ):
            trace.step(first)
    report = verify_trace(f"memory://{name}")
    assert f"step/{first:08d}" in report.damaged and report.intact_steps == first
    del data["rng/00000000"]
    with et.open_trace(f"memory://{name}") as trace:
        with pytest.raises(TraceCorruptError, match=r"record 'rng/00000000' is missing"):
            trace.step(first)


def test_rows_and_hyperparameters_are_stored_compactly_and_read_back_whole() -> None:
    name = th.unique("rows")
    _record(f"memory://{name}")
    with et.open_trace(f"memory://{name}") as trace:
        for t in range(STEPS):
            raw = trace._raw_step(t)
            lr = 0.05 * 0.5 ** (t // 2)
            # the lr alone differs from the header's (recorded when lr was 0.05)
            assert raw["group_changes"] == ([{}] if t < 2 else [{"lr": lr}])
            assert trace.step(t).groups[0] == {
                **trace.meta.optimizer.groups[0].hyperparams,
                "lr": lr,
            }
            f = trace.step(t).forwards[0]
            assert raw["forwards"][0]["rows"] == b"".join(bytes.fromhex(c) for c in f.content_ids)
            assert all(len(c) == 32 for c in f.content_ids)
            assert torch.equal(trace.sample(f.content_ids[0]), f.args[0][0])


def _decode(raw, names):
    back = msgpack.unpackb(msgpack.packb(raw, use_bin_type=True), raw=False)
    return fingerprint.decode(back, "w", lambda o, at: codec.decode_tensor(o, where=at), names)


def test_packed_fingerprints_round_trip_and_malformed_ones_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(100, generator=g), "b": torch.randn(3, generator=g)}
    fps = fingerprint.fingerprints(grads)
    names = ["b", "x", "a"]
    raw = fingerprint.encode(fps, codec.encode_tensor, names)
    assert raw["packed"] == 1 and raw["of"] == [2, 0] and raw["counts"] == [8, 3]
    for back in (_decode(raw, names), _decode(fingerprint.encode(fps, codec.encode_tensor), None)):
        assert back.keys() == fps.keys()
        for n, f in fps.items():
            assert back[n]["bits"] == f["bits"] and back[n]["norm"] == f["norm"]
            assert torch.equal(back[n]["at"], f["at"])
            assert fingerprint.matches(back[n], grads[n], n)
            assert not fingerprint.matches(back[n], grads[n] * (1 + 2**-20), n)
    for bad in ({"counts": [8, 4]}, {"of": [2, 7]}, {"of": [2, 2]}):
        with pytest.raises(TraceCorruptError, match="packed gradient fingerprints are malformed"):
            _decode({**raw, **bad}, names)
    with pytest.raises(TraceCorruptError, match="packed gradient fingerprints are malformed"):
        _decode(raw, None)  # packed maps need the header's names


def test_packed_gradients_read_back_bit_for_bit_and_malformed_ones_are_refused() -> None:
    name = th.unique("grads")
    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = th.data()
    seen = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
    )
    with et.record(model, opt, store=f"memory://{name}"):
        th.train(model, opt, None, x, y, steps=3)
    with et.open_trace(f"memory://{name}") as trace:
        raw = trace._raw_step(1)["grads"]
        assert raw["packed"] == 1 and raw["of"] == list(range(len(trace.param_names)))
        assert raw["data"]["shape"] == [sum(p.numel() for p in model.parameters())]
        for t in range(3):
            grads = trace.step(t).grads
            assert grads.keys() == seen[t].keys()
            assert all(torch.equal(grads[n], seen[t][n]) for n in grads)
    data = MemoryStore(name)._data
    for bad, match in (
        ({"of": [0, 0, 1, 2, 3, 4]}, "parameter list is malformed"),
        ({"of": [0, 1]}, r"stored shape \(\d+,\) differs from \(112,\)"),
    ):
        rec = codec.unpack(data["step/00000001"])
        rec["grads"].update(bad)
        data["step/00000001"] = codec.pack(rec)
        with et.open_trace(f"memory://{name}") as trace:
            with pytest.raises(TraceCorruptError, match=match):
                trace.step_update(1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fingerprint_norm_is_accumulated_in_at_least_float32(dtype: torch.dtype) -> None:
    """The norm only names a cause (a clipping factor to 1%): float32 accumulation is kept
    within 1e-6 of the float64 reference, and half-precision squares do not overflow."""
    g = torch.Generator().manual_seed(2)
    grad = (torch.randn(1000, generator=g, dtype=torch.float64) * 300).to(dtype)
    ref = float(torch.linalg.vector_norm(grad.double()))
    assert ref**2 > 65504  # the sum of squares overflows float16
    got = fingerprint.fingerprints({"w": grad})["w"]["norm"]
    assert got == pytest.approx(ref, rel=1e-6 if dtype != torch.float64 else 1e-15)
