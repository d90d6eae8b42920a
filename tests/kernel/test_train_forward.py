"""The forward-mode training route ("forward_ad", explaind_kernel/train_forward.py) against the
per-sample route, an independent reference (one-hot row cotangents through the plain batched
backward, no vmap over the forward), in float64 at 1e-12 per batch row: train-mode batch norm
and dropout, on models mixing batch-norm and other layers (one with scaled_dot_product_attention
and attention dropout).

The dropout masks of the vmapped tangent passes are the recorded replay's: the CPU generator's
state before and after every dropout call is compared with a plain replay's, and a replay in
another RNG state or in eval mode is caught by the same comparison of K.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import explaind_trace
from explaind_kernel import compute_kernel
from explaind_kernel.functional import FunctionalModel
from explaind_kernel.train_forward import forward_products
from explaind_kernel.training_side import TrainingSide
from tests.kernel.replayed import train_forward

TOL = 1e-12
CPU = torch.device("cpu")


class BNDropMLP(nn.Module):
    """Linear → BatchNorm1d → tanh → dropout → Linear → LayerNorm → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.bn(self.fc1(x))))
        return self.fc3(self.ln(self.fc2(h)))


class BNDropCNN(nn.Module):
    """conv → BatchNorm2d → ReLU → pool → dropout → conv (no norm) → tanh → Linear → BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.25)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 3)
        self.bn2 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(nn.functional.max_pool2d(torch.relu(self.bn1(self.c1(x))), 2))
        return self.bn2(self.fc(torch.tanh(self.c2(h)).flatten(1)))


class AttnBN(nn.Module):
    """Linear → scaled_dot_product_attention (causal, dropout) → BatchNorm1d → Linear."""

    def __init__(self, t: int = 3, d: int = 4) -> None:
        super().__init__()
        self.t, self.d = t, d
        self.qkv = nn.Linear(2, 3 * d)
        self.bn = nn.BatchNorm1d(t * d)
        self.head = nn.Linear(t * d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.qkv(x.view(b, self.t, 2)).chunk(3, -1)
        p = 0.2 if self.training else 0.0
        z = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.head(self.bn(z.reshape(b, -1)))


def _forward(model: nn.Module, shape: tuple[int, ...], batch: int = 7):
    fm, params, bufs, fwd = train_forward(model, shape, batch, seed=5)
    z = {k: torch.randn(9, *v.shape, dtype=torch.float64) for k, v in params.items()}
    return fm, params, bufs, fwd, z


def _fresh(model: nn.Module) -> FunctionalModel:
    return FunctionalModel(model, output_module=None, device=CPU, dtype=torch.float64)


def _assert_rows_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """|got - ref| ≤ 1e-12 × the largest |ref| of its batch row, row by row."""
    scale = ref.abs().amax(1).clamp_min(1e-300)
    assert float(((got - ref).abs().amax(1) / scale).max()) <= TOL


CASES = {"mlp": (BNDropMLP, (4,)), "cnn": (BNDropCNN, (2, 8, 8)), "sdpa": (AttnBN, (6,))}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("block_rows", [1, 4, 64])
def test_forward_ad_equals_per_sample_per_row(name: str, block_rows: int) -> None:
    make, shape = CASES[name]
    model = make()
    fm, params, bufs, fwd, z = _forward(model, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no performance warning, no per-example fallback
        got = TrainingSide(fm, mode="forward_ad", block_rows=block_rows).products(
            params, bufs, fwd, z, per_param=False
        )
    ref = TrainingSide(_fresh(model), mode="per_sample").products(
        params, bufs, fwd, z, per_param=False
    )
    _assert_rows_close(got.k, ref.k)
    for n in params:
        scale = float(ref.grad_sum[n].abs().max())
        assert float((got.grad_sum[n] - ref.grad_sum[n]).abs().max()) <= TOL * max(scale, 1.0)
    assert fm.training_routes == {"forward_ad": 1}


def test_a_wrong_replay_is_caught() -> None:
    """The comparison above sees the masks and the batch statistics: forward-mode AD of the
    same forward in another RNG state (other dropout masks) or in eval mode (running instead
    of batch statistics) is far from the reference."""
    model = BNDropCNN()
    fm, params, bufs, fwd, z = _forward(model, (2, 8, 8))
    ref = TrainingSide(_fresh(model), mode="per_sample").products(
        params, bufs, fwd, z, per_param=False
    )
    for wrong in (
        SimpleNamespace(**{**vars(fwd), "rng_state": torch.manual_seed(99).get_state()}),
        SimpleNamespace(**{**vars(fwd), "training": False}),
    ):
        k, _ = forward_products(fm, params, bufs, wrong, z, block_rows=4)
        assert float((k - ref.k).abs().max()) > 1e-3 * float(ref.k.abs().max())


def test_dropout_draws_are_the_replays() -> None:
    """The generator's state before and after each dropout call, in every block of vmapped
    tangent passes, is the plain replay's: every mask is drawn from the recorded stream."""
    model = BNDropCNN()
    fm, params, bufs, fwd, z = _forward(model, (2, 8, 8))
    states: list[torch.Tensor] = []
    drop = fm.module.get_submodule("drop")
    hooks = [
        drop.register_forward_pre_hook(lambda *a: states.append(torch.get_rng_state())),
        drop.register_forward_hook(lambda *a: states.append(torch.get_rng_state())),
    ]
    try:
        with torch.no_grad(), fm.recorded_mode(fwd):
            fm(params, {k: v.clone() for k, v in bufs.items()}, fwd.args, {})
        replay = list(states)
        states.clear()
        forward_products(fm, params, bufs, fwd, z, block_rows=4)  # 9 rows: 3 blocks
    finally:
        for h in hooks:
            h.remove()
    assert len(replay) == 2 and not torch.equal(replay[0], replay[1])  # it draws
    assert len(states) == 2 * 4  # the Σ G replay and 3 blocks
    for i in range(0, len(states), 2):
        assert torch.equal(states[i], replay[0]) and torch.equal(states[i + 1], replay[1])


class _NoJvpSquare(torch.autograd.Function):
    """x² with a backward and no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _NoJvpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_NoJvpSquare.apply(self.bn(self.fc1(x))))


def test_an_op_without_forward_mode_goes_to_jvp() -> None:
    """Asked for explicitly, forward_ad raises; after the rules fail, the run uses the
    double-backward route instead, and gives what the explicit choice of it gives."""
    model = _NoJvpNet()
    fm, params, bufs, fwd, z = _forward(model, (4,), batch=8)
    z = {k: v[:2] for k, v in z.items()}  # 5·2 < 2·8: forward-mode is the rules' fallback
    with pytest.raises(RuntimeError, match="jvp"):
        TrainingSide(fm, mode="forward_ad").products(params, bufs, fwd, z, per_param=False)
    fm2 = _fresh(model)
    got = TrainingSide(fm2, mode="rules").products(params, bufs, fwd, z, per_param=False)
    assert fm2.training_routes == {"jvp": 1}
    ref = TrainingSide(_fresh(model), mode="jvp").products(params, bufs, fwd, z, per_param=False)
    assert torch.equal(got.k, ref.k)


def _record_bn_drop(store: str, steps: int = 4):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, fresh = BNDropCNN(), BNDropCNN()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(48, 2, 8, 8, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with explaind_trace.record(model, opt, store=store):
        for _ in range(steps):
            idx = torch.randperm(48, generator=g)[:16]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return fresh, x[:2]


def test_kernel_with_forward_ad_equals_per_sample() -> None:
    """A whole kernel run: "rules" hands every forward to forward-mode AD (batch norm couples
    the samples), with no UserWarning, and the result equals the per-sample route's."""
    fresh, test_x = _record_bn_drop("memory://train-forward-kernel")
    kw = dict(dtype="float64", progress=False, cpu_threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = compute_kernel(
            "memory://train-forward-kernel", fresh, test_x[:1], training_mode="rules", **kw
        )
    assert got.extra["training_routes"] == {"forward_ad": 4}
    ref = compute_kernel(
        "memory://train-forward-kernel", fresh, test_x[:1], training_mode="per_sample", **kw
    )
    assert ref.extra["training_routes"] == {"per_sample": 4}
    for field in ("data", "component_data", "step_data", "nondata"):
        a, b = getattr(got, field), getattr(ref, field)
        assert np.max(np.abs(a - b)) <= TOL * np.max(np.abs(ref.data)), field


def test_blocks_are_sized_to_the_activations() -> None:
    """train_blocks: the leaf modules' output bytes are counted (hooks removed afterwards) and
    a block carries about BLOCK_BYTES of them, at least one row and at most block_rows."""
    from explaind_kernel.train_blocks import BLOCK_BYTES, counting_activations, rows_per_block

    model = BNDropMLP().double()
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with counting_activations(model) as seen, torch.no_grad():
        model(torch.randn(5, 4, dtype=torch.float64))
    # fc1, bn, drop: 5×8; fc2, ln: 5×6; fc3: 5×3 (tanh is functional: not seen)
    assert seen[0] == 8 * 5 * (3 * 8 + 2 * 6 + 3)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert rows_per_block(BLOCK_BYTES // 4, 64) == 4
    assert rows_per_block(BLOCK_BYTES * 10, 64) == 1
    assert rows_per_block(10, 64) == 64


def _per_sample_k(model, params, bufs, fwd, z, dtype, monkeypatch=None):
    fm = FunctionalModel(model, output_module=None, device=CPU, dtype=dtype)
    cast = {k: v.to(dtype) for k, v in params.items()}
    cbufs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in bufs.items()}
    f = SimpleNamespace(**{**vars(fwd), "args": (fwd.args[0].to(dtype),)})
    f.cotangent = fwd.cotangent.to(dtype)
    zz = {k: v.to(dtype) for k, v in z.items()}
    return TrainingSide(fm, mode="per_sample").products(cast, cbufs, f, zz, per_param=False).k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_scaling_is_bitwise_where_nothing_is_subnormal(dtype, monkeypatch) -> None:
    """Per-sample gradients of cotangents scaled by powers of two, unscaled, are bitwise the
    plain ones (rows of very different sizes, none subnormal)."""
    import explaind_kernel.train_persample as tp

    model = BNDropCNN()
    fm, params, bufs, fwd, z = _forward(model, (2, 8, 8))
    fwd.cotangent = fwd.cotangent * torch.logspace(-30, 3, 7, dtype=torch.float64)[:, None]
    scaled = _per_sample_k(model, params, bufs, fwd, z, dtype)
    plain = lambda cots, a, b: (torch.ones(b - a, dtype=torch.float64),) * 2  # noqa: E731
    monkeypatch.setattr(tp, "row_scales", plain)
    assert torch.equal(scaled, _per_sample_k(model, params, bufs, fwd, z, dtype))


def test_a_subnormal_cotangent_row_stays_exact(monkeypatch) -> None:
    """A float32 row whose cotangent is subnormal (p < 1.2e-38: a confident classifier's
    cross-entropy) keeps float32's precision against float64 (measured 1.3e-6); unscaled it
    does not (6e-5: the backward ran on subnormals)."""
    import explaind_kernel.train_persample as tp

    model = BNDropCNN()
    fm, params, bufs, fwd, z = _forward(model, (2, 8, 8))
    fwd.cotangent[0] *= 1e-39
    fwd.cotangent = fwd.cotangent.float().double()  # the float32 cotangent, exactly
    ref = _per_sample_k(model, params, bufs, fwd, z, torch.float64)
    rel = lambda k: float((k.double()[0] - ref[0]).abs().max() / ref[0].abs().max())  # noqa: E731
    assert rel(_per_sample_k(model, params, bufs, fwd, z, torch.float32)) < 1e-5
    plain = lambda cots, a, b: (torch.ones(b - a, dtype=torch.float64),) * 2  # noqa: E731
    monkeypatch.setattr(tp, "row_scales", plain)
    assert rel(_per_sample_k(model, params, bufs, fwd, z, torch.float32)) > 1e-5


def test_tiny_cotangent_rows_keep_forward_ad_exact() -> None:
    """Rows whose cotangents are below √(smallest normal) get their own scaled backward for
    Σ G (train_blocks.tiny_row_groups); K and Σ G still equal the per-sample route's at 1e-12
    per row in float64."""
    model = BNDropCNN()
    fm, params, bufs, fwd, z = _forward(model, (2, 8, 8))
    fwd.cotangent[[0, 3]] *= 1e-200
    got = TrainingSide(fm, mode="forward_ad").products(params, bufs, fwd, z, per_param=False)
    ref = TrainingSide(_fresh(model), mode="per_sample").products(
        params, bufs, fwd, z, per_param=False
    )
    _assert_rows_close(got.k, ref.k)
    assert float(got.k[0].abs().max()) < 1e-190 and float(got.k[1].abs().max()) > 1e-3
    for n in params:
        scale = float(ref.grad_sum[n].abs().max())
        assert float((got.grad_sum[n] - ref.grad_sum[n]).abs().max()) <= TOL * max(scale, 1.0)
    # the tiny rows alone: their Σ G is ~1e-200 and still exact to 1e-12 relative
    tiny = SimpleNamespace(**vars(fwd))
    tiny.cotangent = fwd.cotangent.clone()
    tiny.cotangent[[1, 2, 4, 5, 6]] = 0
    got = TrainingSide(_fresh(model), mode="forward_ad").products(
        params, bufs, tiny, z, per_param=False
    )
    ref = TrainingSide(_fresh(model), mode="per_sample").products(
        params, bufs, tiny, z, per_param=False
    )
    scale = max(float(ref.grad_sum[n].abs().max()) for n in params)
    assert 0 < scale < 1e-190
    for n in params:
        assert float((got.grad_sum[n] - ref.grad_sum[n]).abs().max()) <= TOL * scale
