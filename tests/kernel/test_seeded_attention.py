"""Attention in a seeded row pass (explaind_kernel/persample/attention.py) against
scaled_dot_product_attention's math kernel and autograd, in float64 (1e-12 relative to the
largest entry: the same sums in another order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from explaind_kernel import rowjac
from explaind_kernel.persample import attention

from .test_persample import _assert_rows_equal, _setup, _side

D = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    a, b = a.detach(), b.detach()
    assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max()))


def _qkv(lead=(3, 2), rows=5, cols=4, e=6, ev=7):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(*lead, rows, e, generator=g, dtype=D)
    k = torch.randn(*lead, cols, e, generator=g, dtype=D)
    v = torch.randn(*lead, cols, ev, generator=g, dtype=D)
    return q, k, v


CALLS = {  # keyword arguments of scaled_dot_product_attention
    "plain": {},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
    "bool_mask": {"attn_mask": torch.tensor([[1, 0, 1, 1]] * 5, dtype=torch.bool)},
    "float_mask": {"attn_mask": torch.linspace(-1, 1, 20, dtype=D).reshape(5, 4)},
}


def _math(q, k, v, kw):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("name", list(CALLS))
def test_seeded_attention_equals_the_math_kernel_and_its_batched_backward(name) -> None:
    """Values, and the backward for O seeds at once (vmap over autograd.grad, the seeds in the
    products' rows) against the math kernel's backward with is_grads_batched."""
    kw = CALLS[name]
    q, k, v = (t.requires_grad_(True) for t in _qkv(rows=5 if name != "causal" else 4))
    with attention.seeded_attention():
        got = F.scaled_dot_product_attention(q, k, v, **kw)
    ref = _math(q, k, v, kw)
    _close(got, ref)
    seeds = torch.randn(9, *ref.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad([ref], [q, k, v], [seeds], is_grads_batched=True)

    def one(s):
        return torch.autograd.grad([got], [q, k, v], [s], retain_graph=True)

    for a, b in zip(vmap(one)(seeds), want):
        _close(a, b)


def test_the_rule_for_other_batched_inputs_is_the_plain_products() -> None:
    """_AttentionGrad vmapped over q as well as the output gradient: the expanded products."""
    q, k, v = _qkv()
    p = attention._probs(q, k, 0.5, False, None)
    do = torch.randn(4, *q.shape[:-1], v.shape[-1], dtype=D)
    qs = q.unsqueeze(0).expand(4, *q.shape) * torch.arange(1.0, 5.0, dtype=D).reshape(4, 1, 1, 1, 1)
    got = vmap(lambda d, qq: attention._AttentionGrad.apply(d, qq, k, v, p, 0.5))(do, qs)
    for i in range(4):
        want = attention._grads(do[i], qs[i], k, v, p, 0.5)
        for a, b in zip(got, want):
            _close(a[i], b)


@pytest.mark.parametrize(
    "kw",
    [{"dropout_p": 0.1}, {"enable_gqa": True}, {"is_causal": True, "attn_mask": torch.ones(5, 4)}],
    ids=["dropout", "gqa", "mask_and_causal"],
)
def test_calls_it_does_not_compute_go_to_scaled_dot_product_attention(kw) -> None:
    q, k, v = _qkv()
    assert attention._plain_call((q, k, v), kw) is None
    assert attention._plain_call((q, k[..., :3, :], v), {}) is None  # keys ≠ values
    assert attention._plain_call((q, k, v), {}) is not None


def test_a_seeded_pass_on_an_sdpa_model_runs_its_attention_here(monkeypatch) -> None:
    """The seeded rows of the SDPA block go through _Attention and equal autograd's."""
    seen: list = []
    real = attention._Attention.apply

    def spy(*a):
        seen.append(1)
        return real(*a)

    monkeypatch.setattr(attention._Attention, "apply", spy)
    fm, params, bufs, x = _setup("linear_3d_embedding_layernorm_sdpa")
    fm.set_modes(False)
    side = _side(fm, x)
    width = side.width(params, bufs)
    got = rowjac.rule_jacobian(side, params, bufs, (x,), side.index, width)
    assert seen and fm.row_capture(list(params)).seeded
    _assert_rows_equal(got, _side(fm, x, mode="autograd").jacobian(params, bufs))
