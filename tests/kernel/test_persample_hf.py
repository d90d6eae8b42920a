"""Per-row layer rules on Hugging Face GPT-2 against autograd, row by row, in float64.

GPT-2 brings what plain torch models do not: transformers' Conv1D (a Linear with its weight
transposed, hf_conv1d.py), position ids of shape [1, L] shared by every row, an attention
mask passed as a keyword, a ModelOutput tree as the model's output, a tied lm_head, and
scaled_dot_product_attention with dropout inside. Tolerance as in test_persample.py: 1e-12
of the largest entry (the same products summed in another order).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from explaind_kernel import jacobian, rowjac  # noqa: E402
from explaind_kernel.functional import FunctionalModel, OutputSelector  # noqa: E402
from explaind_kernel.persample import (  # noqa: E402
    capture,
    hf_conv1d,
    layer_rule_for,
    registered_layers,
    registry,
)
from explaind_kernel.train_rows import rule_grads  # noqa: E402

from .test_persample import _assert_rows_equal  # noqa: E402  (tolerance 1e-12 of the largest)

CPU = torch.device("cpu")
VOCAB, LEN, ROWS = 13, 6, 3


def _gpt2(dropout: float = 0.1) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=LEN,
        n_embd=8,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _inputs(batch: int = ROWS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, LEN), generator=g)
    mask = torch.ones(batch, LEN, dtype=torch.long)
    mask[0, 4:] = 0  # right padding in the first row, a shorter one in the last
    mask[-1, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _setup(output_module: str | None):
    model = _gpt2()
    fm = FunctionalModel(model, output_module=output_module, device=CPU, dtype=torch.float64)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    bufs = {k: (v.double() if v.is_floating_point() else v) for k, v in model.named_buffers()}
    return fm, params, bufs


def _side(fm, x, **kw) -> jacobian.TestSide:
    def explained(out):  # a few logits of every position: rows see every block
        return out[:, :, :4].sum(1)

    keys = tuple(x)
    return jacobian.TestSide(
        fm,
        OutputSelector(explained),
        tuple(x.values()),
        torch.zeros(ROWS, dtype=torch.long),
        keys=keys,
        **kw,
    )


@pytest.mark.parametrize("output_module", [None, "lm_head"])
def test_gpt2_test_side_rules_equal_autograd_per_row(output_module, monkeypatch) -> None:
    """Every parameter by a rule (no torch.func fallback), also when the explained output is
    the lm_head's: its hook must see the tapped output (the captured one, before the fix)."""
    fm, params, bufs = _setup(output_module)

    def no_fallback(*a, **k):
        raise AssertionError("torch.func fallback used")

    monkeypatch.setattr(rowjac, "func_jacobian", no_fallback)
    x = _inputs()
    side = _side(fm, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = side.jacobian(params, bufs)
    assert side.rules, "the per-row check rejected the rules"
    ref = _side(fm, x, mode="autograd").jacobian(params, bufs)
    _assert_rows_equal(got, ref)


def test_gpt2_rules_at_per_row_points_equal_torch_func() -> None:
    """Conv1D's shift puts each row at its own point θ + s_j·Δθ (kink pieces need it)."""
    fm, params, bufs = _setup("lm_head")
    g = torch.Generator().manual_seed(2)
    delta = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.1 for k, v in params.items()
    }
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    idx = torch.zeros(ROWS, dtype=torch.long)
    fm.set_modes(False)
    x = _inputs()
    side = _side(fm, x)
    got = side._jacobian_shifted(params, delta, bufs, tuple(x.values()), idx, s)
    assert side.rules
    ref = _side(fm, x, rules=False)._jacobian_shifted(
        params, delta, bufs, tuple(x.values()), idx, s
    )
    _assert_rows_equal(got, ref)


def test_gpt2_training_rules_equal_autograd_per_sample_with_dropout_and_padding() -> None:
    """A replayed train-mode forward (dropout in the embeddings, the residuals and inside
    SDPA) with an attention mask: per-sample gradients by the rules equal one autograd
    backward per sample through the same replay."""
    fm, params, bufs = _setup("lm_head")
    batch = 4
    x = _inputs(batch)
    g = torch.Generator().manual_seed(3)
    cot = torch.randn(batch, LEN, VOCAB, generator=g, dtype=torch.float64)
    cot = cot * x["attention_mask"].unsqueeze(-1)  # padding positions carry no loss
    torch.manual_seed(4)
    fwd = SimpleNamespace(
        ids=[str(i) for i in range(batch)],
        args=(),
        kwargs=x,
        cotangent=cot,
        training=True,
        rng_state=torch.get_rng_state(),
    )
    got = rule_grads(fm, params, bufs, fwd, list(params))
    assert got is not None
    ref = {k: [] for k in params}
    for i in range(batch):
        torch.set_rng_state(fwd.rng_state)
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        fm.set_modes(True)
        out = fm(p, dict(bufs), (), x)
        fm.set_modes(False)
        gi = torch.autograd.grad((out[i] * cot[i]).sum(), list(p.values()))
        for k, gk in zip(p, gi):
            ref[k].append(gk)
    _assert_rows_equal(got, {k: torch.stack(v) for k, v in ref.items()})


def test_conv1d_rule_is_bound_by_name_without_importing_transformers() -> None:
    from transformers.pytorch_utils import Conv1D

    assert hf_conv1d.CONV1D in registered_layers()
    assert layer_rule_for(Conv1D(5, 3)) is hf_conv1d.conv1d_rule
    assert registry.layer_shift_for(Conv1D(5, 3)) is hf_conv1d.conv1d_shift


def test_model_output_trees_keep_their_type() -> None:
    """A tapped ModelOutput is still one (the model's caller reads `.logits`)."""
    from transformers.modeling_outputs import CausalLMOutput

    out = CausalLMOutput(logits=torch.zeros(2, 3))
    new = registry.replace_leaves(out, [torch.ones(2, 3)])
    assert type(new) is CausalLMOutput and torch.equal(new.logits, torch.ones(2, 3))
    assert torch.equal(out.logits, torch.zeros(2, 3))  # the original is left alone


def test_a_broadcast_batch_dim_is_expanded_in_place() -> None:
    """Position ids [1, L] shared by every row are seen as [R, L], not [R, 1, L]."""
    assert capture._per_row(torch.zeros(1, 6), 4).shape == (4, 6)
    assert capture._per_row(torch.zeros(6, 2), 4).shape == (4, 6, 2)
