"""ExplaindCallback records Lightning fits: steps, θ_T, kernel completeness, hooks, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Lightning is the optional extra `explaind[lightning]`; without it there is nothing to test.
L = pytest.importorskip("lightning")

from lightning.pytorch.plugins.precision import MixedPrecision, Precision  # noqa: E402

import explaind_kernel as ek  # noqa: E402
import explaind_trace as et  # noqa: E402
from integrations.errors import CallbackStateError, UnsupportedSetupError  # noqa: E402
from integrations.lightning import ExplaindCallback, check_trainer  # noqa: E402

from .support import assert_final_is_model, assert_released, hook_count  # noqa: E402

N, D, C, BATCH = 32, 6, 3, 4
# The kernel's completeness residual is rounding only (docs/design.md §1: ~4e-7 relative in fp32 on
# small models); 1e-4 leaves room for the sum over steps while catching any missing term.
COMPLETENESS_RTOL = 1e-4


class LitMLP(L.LightningModule):
    """Linear-BatchNorm-ReLU-Dropout-Linear (buffers and RNG in the forward), AdamW + StepLR."""

    def __init__(
        self,
        optimizer: str = "adamw",
        fail_at: int | None = None,
        call_net: bool = False,
        manual: bool = False,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, C)
        )
        self.optimizer_name = optimizer
        self.fail_at = fail_at
        self.call_net = call_net
        self.automatic_optimization = not manual
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom at training_step")
        out = self.net(x) if self.call_net else self(x)
        loss = nn.functional.cross_entropy(out, y)
        if self.automatic_optimization:
            return loss
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        return None

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_name == "rmsprop":
            return torch.optim.RMSprop(params, lr=1e-2)
        if self.optimizer_name == "two":
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[4].parameters(), lr=0.1),
            ]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _loader() -> DataLoader:
    x, y = _data()
    return DataLoader(TensorDataset(x, y, torch.arange(N)), batch_size=BATCH, shuffle=False)


def _scaler(init_scale: float) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


def _trainer(cb: ExplaindCallback | None, **kw) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return L.Trainer(callbacks=[] if cb is None else [cb], **opts)


def _fit(tmp_path, name: str = "a", module: LitMLP | None = None, cb_kw=None, **trainer_kw):
    torch.manual_seed(0)
    model = module if module is not None else LitMLP()
    cb = ExplaindCallback(str(tmp_path / f"{name}.lmdb"), **(cb_kw or {}))
    trainer = _trainer(cb, **trainer_kw)
    trainer.fit(model, _loader())
    return model, trainer, cb, str(tmp_path / f"{name}.lmdb")


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory):
    """One fit, two batches accumulated per optimizer step, ids from the batch, clipping on."""
    tmp = tmp_path_factory.mktemp("lightning")
    model, trainer, cb, path = _fit(
        tmp,
        cb_kw={"checkpoint_every": 3, "sample_ids": lambda batch, i: batch[2]},
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
    )
    return model, trainer, cb, path


def test_fit_writes_one_trace_step_per_optimizer_step(accumulated_run) -> None:
    model, trainer, cb, path = accumulated_run
    with et.open_trace(path) as trace:
        assert trainer.global_step == N // BATCH // 2 == 4
        assert trace.num_steps == trainer.global_step
        assert trace.finished and trace.error is None
        # two recorded forwards per step, in order, named by the ids the callback handed over
        ids = [f.ids for t in range(trace.num_steps) for f in trace.step(t).forwards]
        assert ids == [list(range(b * BATCH, (b + 1) * BATCH)) for b in range(8)]  # int ids
        # the StepLR schedule, read from the param groups at each step
        assert [trace.step(t).groups[0]["lr"] for t in range(4)] == [1e-2, 1e-2, 5e-3, 5e-3]
        assert_final_is_model(trace, model)
        drift = trace.check_drift()
        assert all(v == 0.0 for v in drift.checkpoints.values())
    assert not cb.recording


def test_kernel_on_lightning_trace_is_complete(accumulated_run) -> None:
    _, _, _, path = accumulated_run
    torch.manual_seed(123)
    fresh = LitMLP()  # same architecture, other weights: the kernel uses the trace's θ
    x_test, _ = _data(seed=7)
    result = ek.compute_kernel(path, fresh, x_test[:4], outputs="predicted", progress=False)
    _, rel = result.completeness()
    assert rel <= COMPLETENESS_RTOL
    assert result.num_steps == 4 and len(result.sample_ids) == N


def test_hooks_removed_after_fit(accumulated_run) -> None:
    model, trainer, _, _ = accumulated_run
    assert_released(model, trainer.optimizers[0])


def test_hooks_removed_after_fit_that_raises(tmp_path) -> None:
    model = LitMLP(fail_at=3)
    with pytest.raises(RuntimeError, match="boom at training_step"):
        _fit(tmp_path, module=model)
    with et.open_trace(str(tmp_path / "a.lmdb")) as trace:
        assert trace.num_steps == 2 and not trace.finished
        assert "boom at training_step" in trace.error
    assert_released(model, model.trainer.optimizers[0])


def test_unsupported_optimizer_is_refused_at_fit_start(tmp_path) -> None:
    model = LitMLP(optimizer="rmsprop")
    with pytest.raises(et.UnsupportedOptimizerError, match=r"RMSprop is not supported"):
        _fit(tmp_path, module=model)
    assert model.calls == 0  # refused before the first training_step
    assert hook_count(model, model.trainer.optimizers[0]) == 0


def test_more_than_one_optimizer_is_refused(tmp_path) -> None:
    model = LitMLP(optimizer="two", manual=True)
    with pytest.raises(UnsupportedSetupError, match="exactly one optimizer"):
        _fit(tmp_path, module=model)
    assert model.calls == 0


def test_manual_optimization_is_recorded(tmp_path) -> None:
    model, trainer, _, path = _fit(tmp_path, module=LitMLP(manual=True))
    with et.open_trace(path) as trace:
        assert trace.num_steps == N // BATCH == trainer.global_step
        assert trace.finished
        assert [len(trace.step(t).forwards) for t in range(trace.num_steps)] == [1] * 8
        assert_final_is_model(trace, model)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_distributed_strategy_is_refused_without_launching(strategy: str) -> None:
    # Constructing the Trainer launches nothing; check_trainer is what the callback runs in
    # setup() (after Lightning's launcher) and what users can call before fit().
    trainer = _trainer(None, strategy=strategy, devices=2)
    with pytest.raises(
        UnsupportedSetupError, match="DDP recording|distributed strategy DDPStrategy"
    ):
        check_trainer(trainer)
    cb = ExplaindCallback("unused.lmdb")
    with pytest.raises(UnsupportedSetupError, match="separate feature"):
        cb.setup(trainer, LitMLP(), stage="fit")
    assert cb.session is None


def test_weight_averaging_callback_is_refused() -> None:
    swa = L.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=1e-2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[swa])
    with pytest.raises(UnsupportedSetupError, match="StochasticWeightAveraging"):
        check_trainer(trainer)


class _CustomPrecision(Precision):
    pass


def test_unknown_precision_plugin_is_refused(tmp_path) -> None:
    model = LitMLP()
    with pytest.raises(UnsupportedSetupError, match="precision plugin _CustomPrecision"):
        _fit(tmp_path, module=model, plugins=[_CustomPrecision()])
    assert model.calls == 0


@pytest.mark.parametrize(
    "precision",
    ["bf16-mixed", "16-mixed-explicit", "64-true", "bf16-true"],
)
def test_precisions_are_recorded(tmp_path, precision: str) -> None:
    kw: dict = {"precision": precision}
    if precision == "16-mixed-explicit":
        # Lightning turns precision="16-mixed" on CPU into bf16-mixed; the explicit plugin keeps
        # fp16 autocast and a GradScaler, which the callback must hand to the recorder. The
        # initial scale is low enough that no step overflows (see the skip test below).
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=_scaler(2.0**8))]}
    model, trainer, _, path = _fit(tmp_path, **kw)
    with et.open_trace(path) as trace:
        assert trace.finished and trainer.global_step == N // BATCH
        assert trace.num_steps == trainer.global_step and not trace.skips()
        assert_final_is_model(trace, model)
        if precision == "16-mixed-explicit":
            assert trace.meta.raw["grad_scaler"] is True
            assert {f.grad_scale for t in range(8) for f in trace.step(t).forwards} == {2.0**8}
    if precision == "16-mixed-explicit":
        # the recorded cotangent is dL/dlogits of the unscaled loss: compare it with an fp32
        # replay of the first forward (same θ_0, batch and dropout RNG); fp16 logits put the
        # difference at ~1e-3, a missing unscale would put it at 255x the value
        c_ref = _first_cotangent_fp32(path)
        with et.open_trace(path) as trace:
            got = trace.step(0).forwards[0].cotangent.float()
        torch.testing.assert_close(got, c_ref, rtol=0, atol=5e-3)


def _first_cotangent_fp32(path: str) -> torch.Tensor:
    with et.open_trace(path) as trace:
        fwd, start = trace.step(0).forwards[0], trace.checkpoint(0)
        model = LitMLP()
        model.load_state_dict({**start.params, **start.buffers})
        model.train()
        with torch.random.fork_rng():
            torch.set_rng_state(fwd.rng_state)
            logits = model(fwd.args[0]).detach()
    _, y = _data()
    n = logits.shape[0]
    return (logits.softmax(-1) - nn.functional.one_hot(y[:n], C)) / n


def test_overflow_skipped_step_becomes_a_skip_record(tmp_path) -> None:
    # the default initial scale 2**16 overflows fp16 on the first iteration of this model
    plugin = MixedPrecision("16-mixed", "cpu", scaler=_scaler(2.0**16))
    _, trainer, _, path = _fit(tmp_path, plugins=[plugin])
    assert plugin.scaler.get_scale() < 2.0**16  # an overflow did happen
    with et.open_trace(path) as trace:
        assert trace.num_steps + len(trace.skips()) == trainer.global_step
        assert [len(trace.step(t).forwards) for t in range(trace.num_steps)] == [1] * 7


def test_training_step_that_bypasses_the_recorded_module_is_refused(tmp_path) -> None:
    model = LitMLP(call_net=True)
    with pytest.raises(CallbackStateError, match="was never called"):
        _fit(tmp_path, module=model)
    assert_released(model, model.trainer.optimizers[0])


def test_module_option_records_a_submodule(tmp_path) -> None:
    model, trainer, _, path = _fit(tmp_path, module=LitMLP(call_net=True), cb_kw={"module": "net"})
    with et.open_trace(path) as trace:
        assert trace.param_names[0] == "0.weight"
        assert trace.num_steps == trainer.global_step and trace.finished
        assert_final_is_model(trace, model.net)


def test_callback_records_one_fit_only(tmp_path) -> None:
    model, trainer, cb, _ = _fit(tmp_path)
    trainer2 = _trainer(cb, max_epochs=2)
    with pytest.raises(CallbackStateError, match="already recorded a fit"):
        trainer2.fit(model, _loader())


def test_options_are_checked_when_the_callback_is_made() -> None:
    with pytest.raises(ValueError, match="checkpoint_every"):
        ExplaindCallback("a.lmdb", checkpoint_every=0)
    with pytest.raises(ValueError, match="grad_codec"):
        ExplaindCallback("a.lmdb", grad_codec="zip")
    with pytest.raises(TypeError, match="sample_ids"):
        ExplaindCallback("a.lmdb", sample_ids=[1, 2])
    cb = ExplaindCallback("a.lmdb")
    assert cb.recorder is None and not cb.recording


@pytest.mark.parametrize(
    "kind", ["fp32-accumulate", "16-mixed-explicit", "16-mixed-overflow", "bf16-mixed"]
)
def test_recompute_mode_under_lightning(tmp_path, kind: str) -> None:
    """gradients='recompute' under Lightning (closure-driven steps; batch norm and dropout):
    replay with the model rebuilds θ bit for bit, also under fp16 autocast with a GradScaler
    (2**16 overflows on the first iteration: a skip record) and bf16 autocast."""
    kw: dict = {}
    if kind == "fp32-accumulate":
        kw = {"accumulate_grad_batches": 2}
    elif kind == "bf16-mixed":
        kw = {"precision": "bf16-mixed"}
    else:
        scale = 2.0**8 if kind == "16-mixed-explicit" else 2.0**16
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=_scaler(scale))]}
    cb_kw = {"gradients": "recompute", "checkpoint_every": 3}
    model, trainer, _, path = _fit(tmp_path, cb_kw=cb_kw, **kw)
    with et.open_trace(path) as trace:
        assert trace.needs_model and trace.num_steps > 0
        assert bool(trace.skips()) == (kind == "16-mixed-overflow")
        drift = trace.check_drift(model=LitMLP())
        assert drift.exact and max(drift.checkpoints) == trace.num_steps
        assert_final_is_model(trace, model)
