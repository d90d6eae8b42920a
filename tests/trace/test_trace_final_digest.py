"""The final record keeps θ_T and a digest of the optimizer state, not the state itself:
replay rebuilds the state and the digest checks it bit for bit."""

from __future__ import annotations

import pytest
import torch

import explaind_trace as et
from explaind_trace.errors import TraceCorruptError
from explaind_trace.replay import DriftReport, _compare
from explaind_trace.state import decode_state, optimizer_digest
from explaind_trace.stores import MemoryStore
from tests.trace import trace_helpers as th


def _adam_run(store: str, steps: int = 4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = th.data()
    with et.record(model, opt, store=store, checkpoint_every=2):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, opt


def test_final_record_is_theta_and_a_digest_and_replay_matches_it() -> None:
    name = th.unique("final")
    _adam_run(f"memory://{name}")
    with et.open_trace(f"memory://{name}") as trace:
        final, ckpt = trace.final(), trace.checkpoint(2)
        assert final is not None and final.optimizer_state == {}
        assert final.optimizer_digest is not None and len(final.optimizer_digest) == 64
        assert ckpt.optimizer_digest is None and ckpt.optimizer_state  # checkpoints keep it
        store = MemoryStore(name)
        assert len(store.get("final")) < len(store.get("ckpt/00000002")) / 2  # Adam: θ, m, v
        drift = trace.check_drift()
        assert drift.exact and drift.state[trace.num_steps] == 0.0


def test_a_rebuilt_state_that_differs_from_the_digest_is_drift() -> None:
    name = th.unique("final")
    _adam_run(f"memory://{name}")
    with et.open_trace(f"memory://{name}") as trace:
        final = trace.final()
        last = list(trace.replay(trace.num_steps - 1, trace.num_steps))[-1]
    state = {n: dict(st) for n, st in last.state_after.items()}
    report = DriftReport()
    _compare(4, last.next_params, state, final, report)
    assert report.exact
    first = next(iter(state))
    flipped = state[first]["exp_avg"].clone()
    flipped.view(-1).view(torch.int32)[0] ^= 1  # one bit of one moment
    state[first] = {**state[first], "exp_avg": flipped}
    report = DriftReport()
    _compare(4, last.next_params, state, final, report)
    assert not report.exact and report.state[4] == float("inf")


def test_digest_is_canonical_and_sensitive() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = {"b": {"step": 3, "m": t}, "a": {"flag": True, "m": t.clone()}}
    same = {"a": {"m": t.clone(), "flag": True}, "b": {"m": t.clone(), "step": 3.0}}
    assert optimizer_digest(base) == optimizer_digest(same)  # order, int 3 == float 3.0
    for other in (
        {**base, "b": {"step": 4, "m": t}},
        {**base, "b": {"step": 3, "m": t.double()}},
        {**base, "b": {"step": 3, "m": t.reshape(3, 2)}},
        {**base, "b": {"step": 3, "m2": t}},
        {**base, "a": {"flag": False, "m": t}},
    ):
        assert optimizer_digest(other) != optimizer_digest(base)
    bit = t.clone()
    bit.view(-1).view(torch.int32)[5] ^= 1
    assert optimizer_digest({**base, "b": {"step": 3, "m": bit}}) != optimizer_digest(base)


@pytest.mark.parametrize("digest", ["abc", 7, "g" * 64])
def test_a_malformed_digest_is_refused(digest: object) -> None:
    raw = {
        "step": 1,
        "params": {},
        "buffers": {},
        "optimizer_state": {},
        "optimizer_digest": digest,
    }
    with pytest.raises(TraceCorruptError, match="optimizer digest .* is not SHA-256"):
        decode_state(raw, "the final record")
