"""What the recorder captures from ordinary training loops, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import explaind_trace as et
from tests.trace import trace_helpers as th


def _store() -> str:
    return f"memory://{th.unique()}"


def _setup(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = th.MLP(**kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = th.data()
    return model, opt, x, y


def _no_hooks(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    mods = list(model.modules())
    return (
        all(not m._forward_hooks and not m._forward_pre_hooks for m in mods)
        and not opt._optimizer_step_pre_hooks
        and not opt._optimizer_step_post_hooks
        and all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    )


def _replay_forward(model: nn.Module, params: dict[str, torch.Tensor], fwd: et.ForwardRecord):
    """Per-forward gradient J(x)ᵀ c at the recorded θ, RNG, mode and buffers."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(params[n])
        for n, b in m.named_buffers():
            if fwd.buffers is not None:
                b.copy_(fwd.buffers[n])
    m.train(fwd.training)
    torch.set_rng_state(fwd.rng_state)
    out = m(*fwd.args, **fwd.kwargs)
    return torch.autograd.grad(out, list(m.parameters()), fwd.cotangent)


def test_gradient_accumulation_forwards_sum_to_the_recorded_gradient() -> None:
    model, opt, x, y = _setup()
    store = _store()
    with et.record(model, opt, store=store):
        th.train(model, opt, None, x, y, steps=3, accumulate=2, validate=True)
    with et.open_trace(store) as trace:
        for rs in trace.replay():
            fwds = rs.record.forwards
            assert len(fwds) == 2  # both micro-batches; no_grad validation forwards are absent
            per = [_replay_forward(model, rs.params, f) for f in fwds]
            # the same additions in the same order as autograd's accumulation: bitwise
            for i, name in enumerate(trace.param_names):
                assert torch.equal(per[0][i] + per[1][i], rs.record.grads[name]), name


def test_cotangent_is_dloss_doutput_for_a_mean_loss() -> None:
    model, opt, x, y = _setup(bn=False, p=0.0)
    store = _store()
    outs = []
    model.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    with et.record(model, opt, store=store):
        th.train(model, opt, None, x, y, steps=2)
    with et.open_trace(store) as trace:
        fwd = trace.step(1).forwards[0]
        b = fwd.batch_size
        expected = (torch.softmax(outs[1], 1) - nn.functional.one_hot(y[8:16], 3)) / b
        torch.testing.assert_close(
            fwd.cotangent, expected, rtol=0, atol=1e-7
        )  # fp32 softmax rounding
        assert torch.equal(fwd.args[0], x[8:16])


def test_forwards_without_backward_are_dropped() -> None:
    model, opt, x, y = _setup()
    store = _store()
    with et.record(model, opt, store=store):
        for i in range(3):
            model(x[:4])  # grad enabled, never backpropagated
            loss = nn.functional.cross_entropy(model(x[8 * i : 8 * i + 8]), y[8 * i : 8 * i + 8])
            opt.zero_grad()
            loss.backward()
            model.eval()
            model(x[:4]).sum()  # another stray forward, eval mode
            model.train()
            opt.step()
    with et.open_trace(store) as trace:
        assert [len(s.forwards) for s in trace.steps()] == [1, 1, 1]
        assert all(s.forwards[0].batch_size == 8 for s in trace.steps())


def test_retain_graph_double_backward_sums_cotangents() -> None:
    model, opt, x, y = _setup(bn=False, p=0.0)
    store = _store()
    with et.record(model, opt, store=store):
        out = model(x[:8])
        loss = nn.functional.cross_entropy(out, y[:8])
        opt.zero_grad()
        loss.backward(retain_graph=True)
        (0.5 * loss).backward()
        opt.step()
    with et.open_trace(store) as trace:
        fwd = trace.step(0).forwards[0]
        ref = out.detach().requires_grad_()
        (g1,) = torch.autograd.grad(nn.functional.cross_entropy(ref, y[:8]), [ref])
        (g2,) = torch.autograd.grad(0.5 * nn.functional.cross_entropy(ref, y[:8]), [ref])
        assert torch.equal(fwd.cotangent, g1 + g2)


def test_sample_ids_are_stable_across_epochs_and_stored_once() -> None:
    model, opt, x, y = _setup()
    store = _store()
    with et.record(model, opt, store=store):
        for epoch in range(2):
            perm = torch.randperm(48, generator=torch.Generator().manual_seed(epoch))
            for i in range(0, 48, 8):
                idx = perm[i : i + 8]
                loss = nn.functional.cross_entropy(
                    model(
                        x[idx],
                    ),
                    y[idx],
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
    with et.open_trace(store) as trace:
        ids = [[i for f in s.forwards for i in f.ids] for s in trace.steps()]
        first, second = sum(ids[:6], []), sum(ids[6:], [])
        assert len(set(first)) == 48 and set(first) == set(second)
        assert len(list(trace.store.keys("sample/"))) == 48
        # the rows rebuild the inputs exactly
        perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
        assert torch.equal(trace.step(7).forwards[0].args[0], x[perm[8:16]])


def test_user_sample_ids() -> None:
    model, opt, x, y = _setup()
    store = _store()
    with et.record(model, opt, store=store) as rec:
        for i in range(2):
            idx = torch.arange(8 * i, 8 * i + 8)
            rec.set_sample_ids(idx.tolist())
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        rec.set_sample_ids([100, 101])
        with pytest.raises(et.RecordingError, match="2 ids but the next forward has batch size 8"):
            model(x[:8])
        with pytest.raises(et.RecordingError, match="sample ids of mixed types: 'a' is a str"):
            rec.set_sample_ids(["a", "b"])
    with et.open_trace(store) as trace:
        fwd = trace.step(1).forwards[0]
        assert fwd.ids == list(range(8, 16))  # ints stay ints
        assert torch.equal(trace.sample(9), x[9]) and torch.equal(
            trace.sample(fwd.content_ids[1]), x[9]
        )
        with pytest.raises(KeyError):
            trace.sample("nope")


def test_input_structures_and_kwargs() -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, batch, *, scale=1.0, bias=None, tag="x"):
            return {"logits": self.lin(batch["x"]) * scale + bias, "aux": batch["x"].sum(1), "n": 3}

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    store = _store()
    bias = torch.tensor([0.5, -0.5])
    x = torch.randn(6, 4)
    with et.record(net, opt, store=store):
        out = net({"x": x, "mask": torch.ones(6, dtype=torch.bool)}, scale=2.0, bias=bias, tag="t")
        out["logits"].pow(2).sum().backward()
        opt.step()
    with et.open_trace(store) as trace:
        fwd = trace.step(0).forwards[0]
        assert torch.equal(fwd.args[0]["x"], x) and fwd.args[0]["mask"].dtype == torch.bool
        assert (
            fwd.kwargs["scale"] == 2.0
            and fwd.kwargs["tag"] == "t"
            and torch.equal(fwd.kwargs["bias"], bias)
        )
        assert set(fwd.cotangent) == {"logits", "aux", "n"}
        assert fwd.cotangent["aux"] is None and fwd.cotangent["n"] is None
        assert torch.equal(fwd.cotangent["logits"], 2 * out["logits"].detach())


def test_tuple_output() -> None:
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)

        def forward(self, x):
            return self.a(x), self.b(x)

    net = Two()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    store = _store()
    with et.record(net, opt, store=store):
        a, b = net(torch.randn(5, 3))
        (a.sum() + 3 * b.sum()).backward()
        opt.step()
    with et.open_trace(store) as trace:
        ca, cb = trace.step(0).forwards[0].cotangent
        assert torch.equal(ca, torch.ones(5, 2)) and torch.equal(cb, 3 * torch.ones(5, 1))


class LossInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.head(torch.relu(self.body(x))), y)


def test_scalar_output_needs_output_argument() -> None:
    net = LossInside()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = th.data(d_in=4)
    with pytest.raises(et.RecordingError, match="output='name'"):
        with et.record(net, opt, store=_store()):
            net(x[:8], y[:8]).backward()
    assert _no_hooks(net, opt)


def test_output_submodule_records_its_cotangent_and_replays() -> None:
    torch.manual_seed(0)
    net = LossInside()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, y = th.data(d_in=4)
    store = _store()
    thetas = []
    with et.record(net, opt, store=store, output="head"):
        for i in range(4):
            thetas.append(th.snapshot(net))
            opt.zero_grad()
            net(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]).backward()
            opt.step()
    with et.open_trace(store) as trace:
        assert trace.meta.output_module == "head"
        fwd = trace.step(2).forwards[0]
        assert fwd.cotangent.shape == (8, 3) and torch.equal(fwd.args[1], y[16:24])
        logits = net.head(torch.relu(net.body(x[16:24])))  # noqa: F841 (structure check only)
        for rs in trace.replay():
            assert all(torch.equal(rs.params[n], thetas[rs.index][n]) for n in trace.param_names)


def test_output_batch_mismatch_is_an_error() -> None:
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).T

    net = Bad()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(et.RecordingError, match="dim 0 of every output tensor"):
        with et.record(net, opt, store=_store()):
            net(torch.randn(5, 3))


def test_hooks_removed_after_exit_and_after_exception() -> None:
    model, opt, x, y = _setup()
    with et.record(model, opt, store=_store()):
        th.train(model, opt, None, x, y, steps=2)
    assert _no_hooks(model, opt)
    with pytest.raises(ZeroDivisionError):
        with et.record(model, opt, store=_store()):
            th.train(model, opt, None, x, y, steps=1)
            raise ZeroDivisionError
    assert _no_hooks(model, opt)
    th.train(model, opt, None, x, y, steps=2)  # training still works afterwards
    with et.record(model, opt, store=_store()):  # and can be recorded again
        th.train(model, opt, None, x, y, steps=1)


def test_exception_in_loop_keeps_committed_steps_and_records_the_error() -> None:
    model, opt, x, y = _setup()
    store = _store()
    with pytest.raises(RuntimeError, match="boom"):
        with et.record(model, opt, store=store):
            th.train(model, opt, None, x, y, steps=3)
            raise RuntimeError("boom")
    with et.open_trace(store) as trace:
        assert trace.num_steps == 3 and not trace.finished
        assert "boom" in trace.error
        assert trace.final() is not None and trace.check_drift().exact


def test_recording_twice_is_refused() -> None:
    model, opt, x, y = _setup()
    with et.record(model, opt, store=_store()):
        with pytest.raises(et.RecordingError, match="already being recorded"):
            with et.record(model, opt, store=_store()):
                pass
        other = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(et.RecordingError, match="model is already being recorded"):
            et.Recorder(model, other, store=_store()).start()
    assert _no_hooks(model, opt)


def test_unsupported_optimizer_lists_the_supported_ones() -> None:
    model = th.MLP()
    opt = torch.optim.RMSprop(model.parameters())
    with pytest.raises(
        et.UnsupportedOptimizerError, match=r"RMSprop.*torch\.optim\.sgd\.SGD.*register_optimizer"
    ):
        with et.record(model, opt, store=_store()):
            pass
    assert _no_hooks(model, opt)


def test_registered_optimizer_subclass_is_accepted() -> None:
    class MySGD(torch.optim.SGD):
        pass

    model, _, x, y = _setup()
    opt = MySGD(model.parameters(), lr=0.1)
    store = _store()
    with et.record(model, opt, store=store):
        th.train(model, opt, None, x, y, steps=3)
    with et.open_trace(store) as trace:
        assert trace.meta.optimizer.class_name.endswith("MySGD")
        assert trace.check_drift().exact


def test_model_without_trainable_parameters_is_refused() -> None:
    model = th.MLP()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(et.RecordingError, match="no trainable parameters"):
        et.Recorder(model, opt, store=_store()).start()


def test_recorder_start_close_api() -> None:
    model, opt, x, y = _setup()
    store = _store()
    rec = et.Recorder(model, opt, store=store, checkpoint_every=2).start()
    th.train(model, opt, None, x, y, steps=5)
    rec.flush()
    assert rec.steps == 5
    rec.close()
    rec.close()  # idempotent
    assert _no_hooks(model, opt)
    with et.open_trace(store) as trace:
        assert trace.num_steps == 5 and trace.finished and trace.checkpoint_steps == [0, 2, 4]


def test_grad_scaler_skipped_step_is_recorded_as_skipped() -> None:
    torch.manual_seed(0)
    model = th.MLP(bn=False, p=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    x, y = th.data()
    store = _store()
    outs = []
    model.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    thetas = th.train_with_skip(model, opt, scaler, x, y, store)
    assert torch.equal(thetas[2]["fc1.weight"], thetas[3]["fc1.weight"])  # the step was skipped
    with et.open_trace(store) as trace:
        assert trace.num_steps == 4
        (skip,) = trace.skips()
        assert skip.before_step == 2 and skip.reason == "grads_cleared" and len(skip.forwards) == 1
        assert trace.progress["skipped"] == 1
        live = [thetas[t] for t in (0, 1, 3, 4, 5)]
        for rs in trace.replay():
            assert all(torch.equal(rs.params[n], live[rs.index][n]) for n in trace.param_names)
        fwd = trace.step(0).forwards[0]
        assert fwd.grad_scale == 65536.0
        ref = outs[0].requires_grad_()
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(ref, y[:8]), [ref])
        assert torch.equal(fwd.cotangent, g)  # scale is a power of two: unscaling is exact
        assert trace.step(2).forwards[0].grad_scale == 32768.0  # backed off after the overflow


def test_closure_is_refused() -> None:
    model, opt, x, y = _setup()

    def closure():
        return nn.functional.cross_entropy(model(x[:8]), y[:8])

    with pytest.raises(et.RecordingError, match="closure"):
        with et.record(model, opt, store=_store()):
            opt.step(closure)


def test_bf16_grad_codec_is_flagged() -> None:
    model, opt, x, y = _setup()
    store = _store()
    with et.record(model, opt, store=store, grad_codec="bf16"):
        th.train(model, opt, None, x, y, steps=3)
    with et.open_trace(store) as trace:
        assert trace.lossy and trace.meta.grad_codec == "bf16"
        g = trace.step(0).grads["fc1.weight"]
        assert g.dtype == torch.float32 and torch.equal(g, g.bfloat16().float())
        report = trace.check_drift()
        assert report.lossy


def test_buffers_modes_and_rng_are_recorded() -> None:
    model, opt, x, y = _setup()
    model.drop.eval()  # a submodule whose mode differs from the root's
    initial = {n: b.clone() for n, b in model.named_buffers()}
    at_step = []
    opt.register_step_pre_hook(
        lambda o, a, k: at_step.append({n: b.clone() for n, b in model.named_buffers()})
    )
    store = _store()
    with et.record(model, opt, store=store, checkpoint_every=2):
        th.train(model, opt, None, x, y, steps=3, accumulate=2)
    with et.open_trace(store) as trace:
        first = trace.step(0).forwards[0]
        assert first.training and first.mode_overrides == {"drop": False}
        assert all(torch.equal(first.buffers[n], initial[n]) for n in initial)
        second = trace.step(0).forwards[1]  # BN in train mode changed the buffers in between
        assert second.buffers is not None and not torch.equal(
            second.buffers["bn.running_mean"], initial["bn.running_mean"]
        )
        for t in range(3):
            got = trace.buffers_at(t)
            assert all(torch.equal(got[n], at_step[t][n]) for n in initial), t
        assert all(torch.equal(trace.checkpoint(2).buffers[n], at_step[2][n]) for n in initial)
        # the RNG state before the forward reproduces its dropout/BN forward bit for bit
        model2 = th.MLP()
        rs = next(trace.replay(1, 2))
        fwd = rs.record.forwards[0]
        model2.load_state_dict({**rs.params, **fwd.buffers})
        model2.drop.eval()
        torch.set_rng_state(fwd.rng_state)
        out = model2(*fwd.args)
        assert out.shape == fwd.cotangent.shape


def test_tensor_lr_and_frozen_parameters_replay_exactly() -> None:
    torch.manual_seed(0)
    model = th.MLP()
    model.fc1.weight.requires_grad_(False)  # frozen but still handed to the optimizer
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = th.data()
    store = _store()
    thetas: list = []
    with et.record(model, opt, store=store, checkpoint_every=3):
        th.train(model, opt, sched, x, y, steps=6, thetas=thetas)
    with et.open_trace(store) as trace:
        assert "fc1.weight" not in trace.param_names
        assert trace.step(0).tensor_hyperparams[0]["lr"] == "float32"
        for rs in trace.replay():
            assert all(
                torch.equal(rs.next_params[n], thetas[rs.index + 1][n]) for n in trace.param_names
            )
        assert trace.check_drift().exact


def test_unrecordable_inputs_are_clear_errors() -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x=None, extra=None):
            return self.lin(x if x is not None else torch.zeros(4, 3))

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with et.record(net, opt, store=_store()):
        with pytest.raises(et.RecordingError, match=r"kwargs\['extra'\] has type object"):
            net(torch.randn(4, 3), extra=object())
        with pytest.raises(et.RecordingError, match="without a tensor input"):
            net()
        with torch.no_grad():
            net()  # not recorded, so not an error
        out = net(torch.randn(4, 3))  # the recorder recovers after the errors
        out.sum().backward()
        opt.step()


def test_empty_batch_is_recorded_without_samples(tmp_path) -> None:
    """A forward over zero rows (the tail of a sliced dataset) records fine and adds no sample."""
    import explaind_trace as et

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    with et.record(model, opt, store=str(tmp_path / "e.lmdb")):
        for rows in (x, x[4:]):
            opt.zero_grad()
            (model(rows).sum() + 0.0 * model.weight.sum()).backward()
            opt.step()
    with et.open_trace(str(tmp_path / "e.lmdb")) as r:
        assert r.num_steps == 2 and r.finished
        assert [len(f.ids) for f in r.step(1).forwards] in ([0], [])


def test_out_of_place_accumulation_is_not_a_skip(tmp_path) -> None:
    """Holding references to .grad makes autograd accumulate out of place (a new .grad
    object); that is gradient accumulation, not gradients discarded after a skipped step."""
    import explaind_trace as et

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    held = []
    with et.record(model, opt, store=str(tmp_path / "h.lmdb")):
        for _ in range(3):
            opt.zero_grad()
            for _ in range(2):
                model(torch.randn(4, 3)).pow(2).sum().backward()
                held.append([p.grad for p in model.parameters()])
            opt.step()
    with et.open_trace(str(tmp_path / "h.lmdb")) as r:
        assert r.skips() == []
        assert [len(r.step(t).forwards) for t in range(r.num_steps)] == [2, 2, 2]


def test_zero_grad_between_forward_and_backward_after_a_skip(tmp_path) -> None:
    """forward → zero_grad → backward (Lightning's order): an iteration whose step was skipped
    is filed as a skip record, not under the next step."""
    import explaind_trace as et

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with et.record(model, opt, store=str(tmp_path / "z.lmdb")):
        for i in range(3):
            loss = model(torch.randn(4, 3)).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            if i != 1:  # iteration 1 is "skipped" (no step), like a GradScaler overflow
                opt.step()
    with et.open_trace(str(tmp_path / "z.lmdb")) as r:
        assert r.num_steps == 2 and len(r.skips()) == 1
        assert [len(r.step(t).forwards) for t in range(2)] == [1, 1]
