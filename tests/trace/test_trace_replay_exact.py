"""Replay rebuilds every θ_t bit for bit, and recording leaves training bit-identical."""

from __future__ import annotations

import pytest
import torch

import explaind_trace as et
from explaind_trace.optimizers import export_state
from explaind_trace.state import optimizer_digest
from tests.trace import trace_helpers as th

STEPS = 10


def _record(setup: th.Setup, store: str, *, checkpoint_every: int = 4):
    torch.manual_seed(1)
    model = th.MLP()
    opt = setup.make(th.two_groups(model))
    sched = setup.schedule(opt)
    x, y = th.data()
    thetas: list[dict[str, torch.Tensor]] = []
    with et.record(model, opt, store=store, checkpoint_every=checkpoint_every):
        th.train(
            model,
            opt,
            sched,
            x,
            y,
            steps=STEPS,
            accumulate=setup.accumulate,
            set_to_none=setup.set_to_none,
            thetas=thetas,
        )
    return model, opt, thetas


@pytest.mark.parametrize("setup", th.SETUPS, ids=lambda s: s.name)
def test_replay_is_bitwise_at_every_step(setup: th.Setup) -> None:
    store = f"memory://{th.unique(setup.name)}"
    model, opt, thetas = _record(setup, store)
    with et.open_trace(store) as trace:
        assert trace.num_steps == STEPS and trace.finished
        assert trace.checkpoint_steps == [0, 4, 8]
        seen = []
        for rs in trace.replay():
            seen.append(rs.index)
            for name in trace.param_names:
                assert torch.equal(rs.params[name], thetas[rs.index][name]), (rs.index, name)
                assert torch.equal(rs.next_params[name], thetas[rs.index + 1][name]), (
                    rs.index,
                    name,
                )
        assert seen == list(range(STEPS))
        # a replay that starts between checkpoints agrees too
        for rs in trace.replay(5, 7):
            assert all(torch.equal(rs.params[n], thetas[rs.index][n]) for n in trace.param_names)
        for t in (0, 3, 8, STEPS):
            got = trace.params_at(t)
            assert all(torch.equal(got[n], thetas[t][n]) for n in trace.param_names)
        drift = trace.check_drift()
        assert drift.exact and set(drift.checkpoints) == {4, 8, STEPS}
        # the optimizer state after the last replayed step equals the live one, and the
        # final record's digest is that state's (the record keeps no state of its own)
        final = trace.final()
        assert final is not None and final.optimizer_state == {}
        live = dict(zip(trace.param_names, (p for p in model.parameters())))
        names = {id(p): n for n, p in live.items()}
        assert final.optimizer_digest == optimizer_digest(export_state(opt, names))
        last = list(trace.replay(STEPS - 1, STEPS))[-1]
        assert set(last.state_after) == {n for n in trace.param_names if opt.state[live[n]]}
        for name, st in last.state_after.items():
            for k, v in st.items():
                ref = opt.state[live[name]][k]
                assert torch.equal(v, ref) if isinstance(v, torch.Tensor) else v == ref


def test_replay_state_before_after_matches_training() -> None:
    setup = th.SETUPS[-1]  # AdamW amsgrad
    store = f"memory://{th.unique()}"
    torch.manual_seed(1)
    model = th.MLP()
    opt = setup.make(th.two_groups(model))
    x, y = th.data()
    states = []
    names = {id(p): n for n, p in model.named_parameters()}

    def keep(o, args, kwargs):
        states.append(
            {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in o.state.items()}
        )

    handle = opt.register_step_post_hook(keep)
    with et.record(model, opt, store=store, checkpoint_every=3):
        th.train(model, opt, None, x, y, steps=6)
    handle.remove()
    with et.open_trace(store) as trace:
        for rs in trace.replay(1, 6):
            for name, st in rs.state_after.items():
                for k, v in st.items():
                    assert torch.equal(v, states[rs.index][name][k])
            for name, st in rs.state_before.items():
                for k, v in st.items():
                    assert torch.equal(v, states[rs.index - 1][name][k])


@pytest.mark.parametrize("kind", ["lmdb", "dir"])
def test_replay_exact_on_disk_stores(tmp_path, kind: str) -> None:
    store = str(tmp_path / "a.lmdb") if kind == "lmdb" else f"dir://{tmp_path / 'a'}"
    _, _, thetas = _record(th.SETUPS[4], store, checkpoint_every=3)
    with et.open_trace(store) as trace:
        assert trace.segments() == [(0, 3), (3, 6), (6, 9), (9, STEPS)]
        for rs in trace.replay():
            assert all(
                torch.equal(rs.next_params[n], thetas[rs.index + 1][n]) for n in trace.param_names
            )


@pytest.mark.parametrize("setup", [th.SETUPS[2], th.SETUPS[6]], ids=lambda s: s.name)
def test_recording_does_not_change_training(setup: th.Setup) -> None:
    x, y = th.data()
    x0, y0 = x.clone(), y.clone()
    runs = []
    for recorded in (False, True):
        torch.manual_seed(3)
        model = th.MLP()
        opt = setup.make(th.two_groups(model))
        sched = setup.schedule(opt)
        flags = [p.requires_grad for p in model.parameters()]
        if recorded:
            with et.record(model, opt, store=f"memory://{th.unique()}", checkpoint_every=2):
                th.train(model, opt, sched, x, y, steps=8, accumulate=2, validate=True)
        else:
            th.train(model, opt, sched, x, y, steps=8, accumulate=2, validate=True)
        assert flags == [p.requires_grad for p in model.parameters()]
        runs.append((model, opt, torch.get_rng_state()))
    (m0, o0, r0), (m1, o1, r1) = runs
    for (n, a), b in zip(m0.state_dict().items(), m1.state_dict().values()):
        assert torch.equal(a, b), n
    s0, s1 = o0.state_dict(), o1.state_dict()
    assert s0["param_groups"] == s1["param_groups"]
    for i, st in s0["state"].items():
        for k, v in st.items():
            assert (
                torch.equal(v, s1["state"][i][k])
                if isinstance(v, torch.Tensor)
                else v == s1["state"][i][k]
            )
    assert torch.equal(r0, r1)
    assert torch.equal(x, x0) and torch.equal(y, y0)
