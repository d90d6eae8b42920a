"""gradients="recompute": θ_t rebuilt bit for bit from recomputed gradients; the fingerprint
catches gradients that did not come only through the output; gradients="auto" stores them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explaind_trace as et
from explaind_trace import fingerprint
from explaind_trace.info import describe, format_info, format_verify, verify_trace
from tests.trace import trace_helpers as th

STEPS = 10


def _record(setup: th.Setup, store: str, mode: str = "recompute"):
    """The table's run with no_grad eval forwards between steps and, every third step, a
    grad-enabled forward that is never backwarded; returns θ_t for t = 0..STEPS."""
    torch.manual_seed(1)
    model = th.MLP()  # batch norm and dropout
    opt = setup.make(th.two_groups(model))
    sched = setup.schedule(opt)
    x, y = th.data()
    thetas: list[dict[str, torch.Tensor]] = []
    with et.record(model, opt, store=store, checkpoint_every=4, gradients=mode):
        for step in range(STEPS):
            th.train(
                model,
                opt,
                sched,
                x[8 * step % 48 :],
                y[8 * step % 48 :],
                steps=1,
                accumulate=setup.accumulate,
                set_to_none=setup.set_to_none,
                thetas=thetas,
                validate=True,
                batch=4,
            )
            thetas.pop()
            if step % 3 == 0:
                model(x[:5])  # grad-enabled, never backwarded: not part of any step
    thetas.append(th.snapshot(model))
    return thetas


@pytest.mark.parametrize("setup", th.SETUPS, ids=lambda s: s.name)
def test_recompute_rebuilds_every_theta_bitwise(setup: th.Setup) -> None:
    store = f"memory://{th.unique(setup.name)}"
    thetas = _record(setup, store)
    with et.open_trace(store) as trace:
        assert trace.gradients == "recompute" and trace.needs_model
        assert trace.step(1).grads == {} and set(trace.step(1).fingerprints) == set(
            trace.param_names
        )
        fresh = th.MLP()
        seen = []
        for rs in trace.replay(model=fresh):
            seen.append(rs.index)
            for n in trace.param_names:
                assert torch.equal(rs.params[n], thetas[rs.index][n]), (rs.index, n)
                assert torch.equal(rs.next_params[n], thetas[rs.index + 1][n]), (rs.index, n)
            assert set(rs.record.grads) == set(trace.param_names)
        assert seen == list(range(STEPS))
        for t in (3, 5, STEPS):
            got = trace.params_at(t, model=fresh)
            assert all(torch.equal(got[n], thetas[t][n]) for n in trace.param_names)
        assert trace.check_drift(model=fresh).exact


def test_recomputed_gradients_equal_the_stored_ones() -> None:
    setup = th.SETUPS[4]  # Adam with weight decay, accumulation 2
    a, b = f"memory://{th.unique()}", f"memory://{th.unique()}"
    _record(setup, a, "stored")
    _record(setup, b, "recompute")
    with et.open_trace(a) as ta, et.open_trace(b) as tb:
        for ra, rb in zip(ta.replay(), tb.replay(model=th.MLP())):
            assert ra.record.grads.keys() == rb.record.grads.keys()
            for n, g in ra.record.grads.items():
                assert torch.equal(g, rb.record.grads[n]), (ra.index, n)
        assert tb.progress["stored_bytes"] < ta.progress["stored_bytes"]


def test_replay_without_a_model_says_to_pass_it() -> None:
    store = f"memory://{th.unique()}"
    thetas = _record(th.SETUPS[0], store)
    with et.open_trace(store) as trace:
        with pytest.raises(et.ModelRequiredError, match=r"step 0 .*gradients='recompute'.*model="):
            next(iter(trace.replay()))
        with pytest.raises(et.ModelRequiredError, match="Pass the traced model"):
            trace.params_at(3)
        got = trace.params_at(4)  # a checkpoint: stored
        assert all(torch.equal(got[n], thetas[4][n]) for n in trace.param_names)


def test_grad_scaler_skips_in_recompute_mode() -> None:
    torch.manual_seed(0)
    model = th.MLP(p=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    x, y = th.data()
    store = f"memory://{th.unique()}"
    thetas = th.train_with_skip(model, opt, scaler, x, y, store, gradients="recompute")
    live = [thetas[t] for t in (0, 1, 3, 4, 5)]
    with et.open_trace(store) as trace:
        assert trace.num_steps == 4 and len(trace.skips()) == 1
        assert trace.step(0).forwards[0].grad_scale == 65536.0
        for rs in trace.replay(model=th.MLP(p=0.1)):
            assert all(torch.equal(rs.params[n], live[rs.index][n]) for n in trace.param_names)
            assert all(torch.equal(rs.next_params[n], live[rs.index + 1][n]) for n in live[0])


def _tampered(kind: str, store: str, mode: str, start: int, steps: int = 8) -> None:
    """SGD+momentum training where, from step `start`, the optimizer's gradient is not the
    output's: clipped, with an L2 term in the loss, or changed by a gradient hook."""
    torch.manual_seed(0)
    model = th.MLP(bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = th.data()
    with et.record(model, opt, store=store, checkpoint_every=4, gradients=mode):
        for step in range(steps):
            if kind == "hook" and step == start:
                model.fc1.bias.register_hook(lambda g: g * 0.5 + 1e-3)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[:8]), y[:8])
            if kind == "l2" and step >= start:
                loss = loss + 1e-2 * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            if kind == "clip" and step >= start:
                nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()


@pytest.mark.parametrize(
    "kind,cause",
    [
        ("clip", "scaled by .*: gradient clipping"),
        ("l2", r"·θ: an L2 term on the parameters in the loss"),
        ("hook", "a gradient hook"),
    ],
)
def test_fingerprint_names_the_step_and_the_cause(kind: str, cause: str) -> None:
    store = f"memory://{th.unique(kind)}"
    _tampered(kind, store, "recompute", start=2)
    with et.open_trace(store) as trace:
        fresh = th.MLP(bn=False)
        got = []
        with pytest.raises(et.GradientMismatchError, match=f"step 2, parameter .*{cause}") as e:
            for rs in trace.replay(model=fresh):
                got.append(rs.index)
        assert got == [0, 1]  # the steps before were exact
        assert "gradients='stored'" in str(e.value) and "gradients='auto'" in str(e.value)


@pytest.mark.parametrize("kind", ["clip", "l2", "hook"])
def test_auto_stores_gradients_from_the_checkpoint_that_differs(kind: str) -> None:
    store, ref = f"memory://{th.unique(kind)}", f"memory://{th.unique(kind)}"
    _tampered(kind, store, "auto", start=4)
    _tampered(kind, ref, "stored", start=4)
    with et.open_trace(store) as trace, et.open_trace(ref) as stored:
        assert trace.gradients_stored_from == 4 and trace.needs_model
        assert "step 4, parameter" in trace.progress["gradients_switch_reason"]
        assert trace.step(3).fingerprints is not None and trace.step(4).fingerprints is None
        for ra, rb in zip(stored.replay(), trace.replay(model=th.MLP(bn=False))):
            assert all(torch.equal(ra.next_params[n], rb.next_params[n]) for n in ra.params)
        text = format_info(describe(store, check_drift=False))
        assert "auto: recomputed steps 0..3, stored from step 4" in text


def test_auto_on_a_clean_run_keeps_recomputing() -> None:
    store = f"memory://{th.unique()}"
    thetas = _record(th.SETUPS[5], store, "auto")
    with et.open_trace(store) as trace:
        assert trace.gradients_stored_from is None
        assert all(trace.step(t).fingerprints is not None for t in range(STEPS))
        for rs in trace.replay(model=th.MLP()):
            assert all(torch.equal(rs.next_params[n], thetas[rs.index + 1][n]) for n in rs.params)


def test_auto_switch_at_step_zero_replays_without_a_model() -> None:
    store = f"memory://{th.unique()}"
    _tampered("clip", store, "auto", start=0)
    with et.open_trace(store) as trace:
        assert trace.gradients_stored_from == 0 and not trace.needs_model
        assert trace.check_drift().exact
        assert "gradient clipping" in trace.progress["gradients_switch_reason"]


def test_gradients_option_is_validated_and_old_traces_read_as_stored() -> None:
    with pytest.raises(ValueError, match="gradients must be one of"):
        et.RecordOptions(gradients="sometimes")
    assert et.RecordOptions.from_record({"checkpoint_every": 3}).gradients == "stored"
    assert et.RecordOptions(gradients="auto").to_record()["gradients"] == "auto"


def test_fingerprint_sees_one_changed_bit_and_signed_zeros() -> None:
    g = torch.randn(1000)
    fp = fingerprint.fingerprints({"w": g})["w"]
    assert fingerprint.matches(fp, g.clone(), "w")
    for i in (0, 517, 999):  # any element, sampled or not
        h = g.clone()
        h.view(torch.int32)[i] ^= 1  # the lowest mantissa bit
        assert not fingerprint.matches(fp, h, "w")
    z = torch.zeros(10)
    assert not fingerprint.matches(fingerprint.fingerprints({"b": z})["b"], -z, "b")
    assert fingerprint.positions("w", 1000) == fingerprint.positions("w", 1000)
    assert len(set(fingerprint.positions("w", 1000))) == fingerprint.SAMPLES


def test_info_says_the_mode_and_that_theta_is_verified_at_replay() -> None:
    store = f"memory://{th.unique()}"
    _record(th.SETUPS[0], store)
    d = describe(store)
    assert d["gradients"] == "recompute" and d["drift"] is None
    text = format_info(d)
    assert "recompute: not stored, recomputed from the forwards" in text
    assert "verified when the kernel replays" in text
    report = verify_trace(store)
    assert report.ok and report.intact_steps == STEPS
    assert "records only" in format_verify(report) and "needs the model" in report.note


class _LossInside(nn.Module):
    """A frozen embedding, then an MLP whose forward returns the loss (output="head" names
    the logits), as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 6)
        self.embed.requires_grad_(False)
        self.body = th.MLP(d_in=6, d_out=8, bn=False, p=0.2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.body(self.embed(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_recompute_with_an_output_submodule_and_frozen_parameters() -> None:
    torch.manual_seed(0)
    model = _LossInside()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = th.data()
    store = f"memory://{th.unique()}"
    thetas = []
    with et.record(model, opt, store=store, output="head", gradients="auto", checkpoint_every=3):
        for i in range(6):
            thetas.append(th.snapshot(model))
            opt.zero_grad()
            model(x[8 * i : 8 * i + 8], labels=y[8 * i : 8 * i + 8])["loss"].backward()
            opt.step()
    thetas.append(th.snapshot(model))
    fresh = _LossInside()
    fresh.embed.load_state_dict(model.embed.state_dict())  # frozen: the model's own values
    with et.open_trace(store) as trace:
        assert trace.gradients_stored_from is None and "embed.weight" not in trace.param_names
        for rs in trace.replay(model=fresh):
            assert all(torch.equal(rs.next_params[n], thetas[rs.index + 1][n]) for n in rs.params)


def test_cli_info_with_the_model_replays_and_checks(tmp_path, capsys) -> None:
    from explaind_attr import cli

    path = tmp_path / "r.lmdb"
    _record(th.SETUPS[1], str(path))
    assert cli.main(["info", "--verify", str(path)]) == 0
    assert "records only" in capsys.readouterr().out
    model = "tests.trace.trace_helpers:MLP"
    assert cli.main(["info", "--verify", str(path), "--model", model]) == 0
    out = capsys.readouterr().out
    assert "every gradient matched its fingerprint, bitwise at every checkpoint" in out
    assert "replay drift  exact (bitwise at every checkpoint)" in out


def test_recompute_under_autocast() -> None:
    """A forward run under torch.autocast (here CPU bf16) is run again under the same casts:
    θ rebuilt bit for bit (without the recorded autocast state every gradient differs)."""
    torch.manual_seed(0)
    model = th.MLP(bn=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = th.data()
    store = f"memory://{th.unique()}"
    thetas = []
    with et.record(model, opt, store=store, gradients="recompute", checkpoint_every=3):
        for i in range(5):
            thetas.append(th.snapshot(model))
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x[8 * i : 8 * i + 8])
            nn.functional.cross_entropy(out.float(), y[8 * i : 8 * i + 8]).backward()
            opt.step()
    thetas.append(th.snapshot(model))
    with et.open_trace(store) as trace:
        assert trace.step(0).forwards[0].autocast == {"cpu": "bfloat16"}
        for rs in trace.replay(model=th.MLP(bn=False)):
            assert all(torch.equal(rs.next_params[n], thetas[rs.index + 1][n]) for n in rs.params)


def test_likely_cause_of_each_kind_of_difference() -> None:
    g = torch.Generator().manual_seed(0)
    want, theta = torch.randn(500, generator=g), torch.randn(500, generator=g)
    fp = fingerprint.fingerprints({"w": want})["w"]

    def cause(got: torch.Tensor) -> str:
        return fingerprint.likely_cause(fp, got, theta, "w")

    assert "gradient clipping" in cause(want / 0.3)  # the optimizer saw 0.3 × the output's
    assert "0.02·θ: an L2 term" in cause(want - 0.02 * theta)
    noise = torch.randn(500, generator=g)
    assert "last bits" in cause(want * (1 + 1e-7 * noise))
    assert "differ slightly" in cause(want * (1 + 1e-3 * noise))
    assert "a gradient hook" in cause(want + 0.5 * noise)


def test_auto_check_that_cannot_run_stores_gradients_and_training_goes_on(monkeypatch) -> None:
    from explaind_trace import recompute

    def broken(*args, **kwargs):
        raise RuntimeError("no functional call for this model")

    monkeypatch.setattr(recompute, "step_gradients", broken)
    store = f"memory://{th.unique()}"
    thetas = _record(th.SETUPS[0], store, "auto")  # training finishes
    with et.open_trace(store) as trace:
        assert trace.gradients_stored_from == 0 and not trace.needs_model
        assert (
            "could not run (RuntimeError: no functional call"
            in trace.progress["gradients_switch_reason"]
        )
        final = trace.params_at(STEPS)
        assert all(torch.equal(final[n], thetas[STEPS][n]) for n in trace.param_names)


def test_replay_with_a_model_of_another_dtype_is_refused() -> None:
    store = f"memory://{th.unique()}"
    _record(th.SETUPS[0], store)
    with et.open_trace(store) as trace:
        with pytest.raises(et.TraceMismatchError, match="dtype float64, the trace has float32"):
            next(iter(trace.replay(model=th.MLP().double())))


class _Bf16WithFp32Buffer(nn.Module):
    """bf16 parameters and a float32 buffer (as HF keeps rotary frequencies): the replay
    must not cast the buffer to the parameters' dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("freq", torch.linspace(0.1, 3.3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (self.freq * 1.37).exp().to(x.dtype)


def test_recompute_keeps_the_recorded_dtypes_of_inputs_and_buffers() -> None:
    torch.manual_seed(0)
    model = _Bf16WithFp32Buffer().to(torch.bfloat16)
    model.freq = model.freq.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    x = x.to(torch.bfloat16)
    store = f"memory://{th.unique()}"
    thetas = []
    with et.record(model, opt, store=store, gradients="recompute"):
        for i in range(4):
            thetas.append(th.snapshot(model))
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(x[8 * i : 8 * i + 8]).float(), y[8 * i : 8 * i + 8]
            ).backward()
            opt.step()
    thetas.append(th.snapshot(model))
    fresh = _Bf16WithFp32Buffer().to(torch.bfloat16)
    fresh.freq = fresh.freq.float()
    with et.open_trace(store) as trace:
        assert trace.checkpoint(0).buffers["freq"].dtype == torch.float32
        for rs in trace.replay(model=fresh):
            assert all(torch.equal(rs.next_params[n], thetas[rs.index + 1][n]) for n in rs.params)
