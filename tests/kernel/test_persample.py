"""Per-row layer rules (explaind_kernel/persample) against autograd, row by row, in float64.

Tolerance: 1e-12 relative to the largest Jacobian entry — the rules and autograd sum the same
products in a different order, so they agree to rounding (~1e-16) on these tiny models.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explaind_kernel import compute_kernel, jacobian, rowjac
from explaind_kernel.functional import FunctionalModel, OutputSelector
from explaind_kernel.persample import linear as linear_rules
from explaind_kernel.persample import registry
from explaind_kernel.train_rows import rows_check, rule_grads
from explaind_kernel.training_side import TrainingSide
from tests.kernel.replayed import train_forward

TOL = 1e-12
CPU = torch.device("cpu")


class SDPABlock(nn.Module):
    """Embedding (tokens and positions) → LayerNorm → q/k/v projections → SDPA → out → head."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, t: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(t, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        q, k, v = self.qkv(self.ln(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(z.transpose(1, 2).reshape(b, t, -1))
        return self.head(h[:, -1])


class MHAModel(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(9, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        z, _ = self.attn(h, h, h, need_weights=False)
        if not self.batch_first:
            z = z.transpose(0, 1)
        return self.head(z.mean(1))


class ConvModel(nn.Module):
    """Conv2d (stride, groups, reflect padding) → BatchNorm2d → Conv1d → BatchNorm1d → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv1d(4, 3, 2, dilation=2)
        self.bn1 = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3 * 12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn2(self.c2(x)))  # [B, 4, 4, 4]
        h = torch.tanh(self.bn1(self.c1(h.flatten(2))))  # [B, 3, 14]
        return self.fc(h[..., :12].flatten(1))


class Scaled(nn.Module):
    """A custom module with no closed-form rule (the local torch.func rule treats it)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x * self.scale)


class Mixed(nn.Module):
    """Covered layers, a module without a rule, and a parameter of the root itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.mid = Scaled(6)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.mid(self.fc1(x)) + self.bias)


class RootTable(nn.Module):
    """Parameters of the root read directly: a sliced positional table and a learned scale."""

    def __init__(self, vocab: int = 9, d: int = 6, t: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(x) + self.pos[: x.shape[1]])
        return self.head((h * self.scale.view(1, 1, -1)).mean(1))


def _tokens(n: int, t: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


CASES = {
    "linear_3d_embedding_layernorm_sdpa": (SDPABlock, lambda: _tokens(3, 4, 11)),
    "mha_batch_first": (lambda: MHAModel(True), lambda: _tokens(3, 5, 9)),
    "mha_seq_first": (lambda: MHAModel(False), lambda: _tokens(3, 5, 9)),
    "conv1d_conv2d_batchnorm_eval": (ConvModel, lambda: torch.randn(3, 2, 8, 8)),
    "mixed_covered_uncovered": (Mixed, lambda: torch.randn(3, 4)),
    "root_parameters_read_directly": (RootTable, lambda: _tokens(3, 4, 9)),
}


def _setup(name: str):
    torch.manual_seed(0)
    make, data = CASES[name]
    model = make()
    for m in model.modules():  # non-trivial running statistics for eval-mode batch norm
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fm = FunctionalModel(model, output_module=None, device=CPU, dtype=torch.float64)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    bufs = {k: (v.double() if v.is_floating_point() else v) for k, v in model.named_buffers()}
    x = data()
    x = x.double() if x.is_floating_point() else x
    return fm, params, bufs, x


def _side(fm, x, **kw) -> jacobian.TestSide:
    return jacobian.TestSide(
        fm, OutputSelector("all"), (x,), torch.zeros(len(x), dtype=torch.long), **kw
    )


def _assert_rows_equal(got, ref) -> None:
    scale = max(float(v.abs().max()) for v in ref.values())
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert float((got[k] - ref[k]).abs().max()) <= TOL * scale, k


@pytest.mark.parametrize("name", list(CASES))
def test_test_side_rules_equal_autograd_per_row(name, monkeypatch) -> None:
    fm, params, bufs, x = _setup(name)

    def no_fallback(*a, **k):
        raise AssertionError("torch.func fallback used")

    monkeypatch.setattr(rowjac, "func_jacobian", no_fallback)  # every parameter by a rule
    side = _side(fm, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = side.jacobian(params, bufs)
    assert side.rules, "the per-row check rejected the rules"
    ref = _side(fm, x, mode="autograd").jacobian(params, bufs)
    _assert_rows_equal(got, ref)


@pytest.mark.parametrize(
    "name",
    [
        "linear_3d_embedding_layernorm_sdpa",
        "conv1d_conv2d_batchnorm_eval",
        "root_parameters_read_directly",
    ],
)
def test_rules_at_per_row_points_equal_torch_func(name) -> None:
    """Kink pieces put every test input at its own point θ + s_j·Δθ (the layers' shifts)."""
    fm, params, bufs, x = _setup(name)
    g = torch.Generator().manual_seed(2)
    delta = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.1 for k, v in params.items()
    }
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    idx = torch.zeros(3, dtype=torch.long)
    fm.set_modes(False)  # the test side evaluates in eval mode
    side = _side(fm, x)
    got = side._jacobian_shifted(params, delta, bufs, (x,), idx, s)
    assert side.rules
    ref = _side(fm, x, rules=False)._jacobian_shifted(params, delta, bufs, (x,), idx, s)
    _assert_rows_equal(got, ref)


def test_a_wrong_rule_is_caught_per_row(monkeypatch) -> None:
    """Rolling the rows of the Linear rule keeps every sum over rows (what a sum check sees)
    but is wrong per row: the check must hand the test side to torch.func."""
    fm, params, bufs, x = _setup("mixed_covered_uncovered")
    right = linear_rules.linear_rule

    def rolled(module, call, rows):
        return {k: v.roll(1, 0) for k, v in right(module, call, rows).items()}

    monkeypatch.setitem(registry._RULES, nn.Linear, rolled)
    side = _side(fm, x)
    got = side.jacobian(params, bufs)
    assert not side.rules
    _assert_rows_equal(got, _side(fm, x, mode="autograd").jacobian(params, bufs))


# ------------------------------------------------------------------ training side
class DropMLP(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8) if bn else nn.LayerNorm(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x)))))


def _forward(model, batch: int = 6):
    return train_forward(model, (4,), batch, seed=3)


def _per_sample_reference(fm, params, bufs, fwd):
    """G_i by one autograd backward per sample through the batched train-mode replay."""
    rows = {k: [] for k in params}
    for i in range(len(fwd.ids)):
        torch.set_rng_state(fwd.rng_state)
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        fm.set_modes(True)
        out = fm(p, {k: v.clone() for k, v in bufs.items()}, fwd.args, {})
        fm.set_modes(False)
        gi = torch.autograd.grad((out[i] * fwd.cotangent[i]).sum(), list(p.values()))
        for k, g in zip(p, gi):
            rows[k].append(g)
    return {k: torch.stack(v) for k, v in rows.items()}


def test_training_rules_equal_autograd_per_sample_with_dropout() -> None:
    fm, params, bufs, fwd = _forward(DropMLP())
    got = rule_grads(fm, params, bufs, fwd, list(params))
    ref = _per_sample_reference(fm, params, bufs, fwd)
    _assert_rows_equal(got, ref)
    z = {k: torch.randn(5, *v.shape, dtype=torch.float64) for k, v in params.items()}
    k = sum(got[n].reshape(6, -1) @ z[n].reshape(5, -1).T for n in params)
    assert rows_check(fm, params, bufs, fwd, got, z, k, seed=0)
    # a deliberately wrong per-sample result with the right sums (rows rolled) is caught
    wrong = {n: g.roll(1, 0) for n, g in got.items()}
    k_wrong = sum(wrong[n].reshape(6, -1) @ z[n].reshape(5, -1).T for n in params)
    assert torch.allclose(k_wrong.sum(0), k.sum(0), rtol=0, atol=1e-12)
    assert not rows_check(fm, params, bufs, fwd, wrong, z, k_wrong, seed=0)


def test_train_mode_batch_norm_is_caught_and_the_kernel_stays_exact() -> None:
    """Batch statistics couple the samples: the per-sample check fails (the sums would still
    agree) and the training side answers by a batched route, equal to the explicit one."""
    fm, params, bufs, fwd = _forward(DropMLP(bn=True))
    got = rule_grads(fm, params, bufs, fwd, list(params))
    ref = _per_sample_reference(fm, params, bufs, fwd)
    for n in ref:  # what a sum check sees: the rules' totals equal the batch gradient
        assert float((got[n].sum(0) - ref[n].sum(0)).abs().max()) <= 1e-12
    assert any(float((got[n] - ref[n]).abs().max()) > 1e-6 for n in ref)
    z = {k: torch.randn(5, *v.shape, dtype=torch.float64) for k, v in params.items()}
    k = sum(got[n].reshape(6, -1) @ z[n].reshape(5, -1).T for n in params)
    assert not rows_check(fm, params, bufs, fwd, got, z, k, seed=0)
    rules = TrainingSide(fm, mode="rules").products(params, bufs, fwd, z, per_param=False)
    fm2 = FunctionalModel(DropMLP(bn=True), output_module=None, device=CPU, dtype=torch.float64)
    explicit = TrainingSide(fm2, mode="per_sample").products(params, bufs, fwd, z, per_param=False)
    assert torch.equal(rules.k, explicit.k)


@pytest.mark.parametrize("bn", [False, True])
def test_auto_route_is_bitwise_the_explicit_route(bn: bool) -> None:
    fm, params, bufs, fwd = _forward(DropMLP(bn=bn))
    z = {k: torch.randn(5, *v.shape, dtype=torch.float64) for k, v in params.items()}
    auto = TrainingSide(fm, mode="auto")
    got = auto.products(params, bufs, fwd, z, per_param=True)
    route = auto.route
    assert route in ("rules", "per_sample") and (route == "rules") != bn or route == "per_sample"
    fm2 = FunctionalModel(DropMLP(bn=bn), output_module=None, device=CPU, dtype=torch.float64)
    explicit = TrainingSide(fm2, mode=route).products(params, bufs, fwd, z, per_param=True)
    assert torch.equal(got.k, explicit.k)
    for n in params:
        assert torch.equal(got.k_param[n], explicit.k_param[n])
        assert torch.equal(got.grad_sum[n], explicit.grad_sum[n])


def test_sdpa_transformer_kernel_runs_without_user_warnings(tmp_path) -> None:
    """No per-example fallback (torch warns when vmap meets a fused attention kernel)."""
    import explaind_trace

    torch.manual_seed(0)
    model, fresh = SDPABlock(), SDPABlock()
    fresh.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _tokens(16, 4, 11), torch.randint(0, 5, (16,))
    store = "memory://persample-sdpa"
    with explaind_trace.record(model, opt, store=store):
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(
                model(x[4 * step : 4 * step + 8]), y[4 * step : 4 * step + 8]
            ).backward()
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = compute_kernel(store, fresh, x[:3], dtype="float64", progress=False, kink_splits=4)
    with torch.no_grad():
        actual = model(x[:3]).double().numpy()
    assert np.max(np.abs(res.fT - actual)) <= 1e-6 * np.max(np.abs(actual))
    # trained in fp32, so float64 completes to ~1e-8 relative (KernelConfig.dtype explains why)
    assert np.max(np.abs(res.completeness_residual)) <= 1e-7 * np.max(np.abs(actual))
    assert math.isfinite(float(np.abs(res.data).sum()))


def test_a_registered_rule_for_a_custom_layer_is_used(monkeypatch) -> None:
    """register_layer_rule: the user's rule replaces the local torch.func rule."""
    from explaind_kernel import register_layer_rule

    calls = []

    def scaled_rule(module, call, rows):
        calls.append(rows)
        x, g = call.args[0], call.gout
        return {"scale": (g * torch.cos(x * call.state["scale"]) * x).reshape(rows, -1)}

    monkeypatch.setitem(registry._RULES, Scaled, registry._RULES.get(Scaled))
    register_layer_rule(Scaled)(scaled_rule)
    fm, params, bufs, x = _setup("mixed_covered_uncovered")
    got = _side(fm, x).jacobian(params, bufs)
    assert calls, "the registered rule was not called"
    _assert_rows_equal(got, _side(fm, x, mode="autograd").jacobian(params, bufs))
