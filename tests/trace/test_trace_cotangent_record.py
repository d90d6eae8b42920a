"""Recording with ``cotangent_codec="auto"``: the header says so, cross-entropy cotangents are
stored as targets and scales (far fewer bytes), and read back as deferred cotangents that
resolve, from the forward's logits, to exactly the cotangents a generic recording stores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explaind_trace as et
from explaind_trace import codec
from explaind_trace import cotangent_codec as cc
from tests.trace import trace_helpers as th


class TinyLM(nn.Module):
    """Embedding -> linear head: logits [B, T, V] for a per-token loss."""

    def __init__(self, vocab: int = 40, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens)))


def _mlp_run(codec: str, loss: str = "ce", steps: int = 4):
    """A seeded MLP classifier run; the store and the outputs the model returned."""
    torch.manual_seed(0)
    model = th.MLP(d_out=20, bn=True, p=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = th.data(classes=20)
    store = f"memory://{th.unique()}"
    outs: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    with et.record(model, opt, store=store, cotangent_codec=codec, checkpoint_every=2):
        for t in range(steps):
            idx = torch.arange(8 * t, 8 * t + 8) % 48
            out = model(x[idx])
            if loss == "ce":
                value = nn.functional.cross_entropy(out, y[idx])
            elif loss == "smoothing":
                value = nn.functional.cross_entropy(out, y[idx], label_smoothing=0.1)
            else:
                value = ((out - 1) ** 2).mean()
            opt.zero_grad()
            value.backward()
            opt.step()
    return store, outs


def _lm_run(codec: str, steps: int = 3):
    torch.manual_seed(1)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 40, (4, 9), generator=g)
    store = f"memory://{th.unique()}"
    outs: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    with et.record(model, opt, store=store, cotangent_codec=codec):
        for _ in range(steps):
            logits = model(tokens[:, :-1])
            labels = tokens[:, 1:].clone()
            labels[0, -3:] = -100  # padding
            loss = nn.functional.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return store, outs


def _raw(t: torch.Tensor) -> bytes:
    return codec.tensor_to_bytes(t)


@pytest.mark.parametrize("run", [_mlp_run, _lm_run])
def test_codec_cotangents_resolve_to_the_generic_ones_bit_for_bit(run) -> None:
    generic, _ = run("generic")
    auto, outs = run("auto")
    with et.open_trace(generic) as g, et.open_trace(auto) as a:
        assert g.meta.options.cotangent_codec == "generic"
        assert a.meta.options.cotangent_codec == "auto"
        for t in range(a.num_steps):
            fa, fg = a.step(t).forwards[0], g.step(t).forwards[0]
            assert isinstance(fa.cotangent, cc.DeferredCotangent)
            got = fa.cotangent.resolve(outs[t])  # the logits of that very forward
            assert _raw(got) == _raw(fg.cotangent)
        cot_a = a.progress["kind_bytes"]["cotangents"]
        cot_g = g.progress["kind_bytes"]["cotangents"]
        assert cot_a * 3 < cot_g, (cot_a, cot_g)


@pytest.mark.parametrize("loss", ["mse", "smoothing"])
def test_cotangents_without_the_structure_are_stored_and_read_as_tensors(loss: str) -> None:
    generic, _ = _mlp_run("generic", loss)
    auto, _ = _mlp_run("auto", loss)
    with et.open_trace(generic) as g, et.open_trace(auto) as a:
        for t in range(a.num_steps):
            fa, fg = a.step(t).forwards[0], g.step(t).forwards[0]
            assert isinstance(fa.cotangent, torch.Tensor)
            assert _raw(fa.cotangent) == _raw(fg.cotangent)


def test_an_output_changed_in_place_after_its_forward_falls_back_to_the_tensor_codec() -> None:
    torch.manual_seed(0)
    model = th.MLP(bn=False, p=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    store = f"memory://{th.unique()}"
    with et.record(model, opt, store=store, cotangent_codec="auto"):
        out = model(x[:8])
        scaled = out * 1.0
        nn.functional.cross_entropy(scaled, y[:8]).backward()
        with torch.no_grad():
            out.add_(1.0)  # the recorded logits are no longer what the loss saw
        opt.step()
    with et.open_trace(store) as trace:
        assert isinstance(trace.step(0).forwards[0].cotangent, torch.Tensor)


def test_the_option_is_checked() -> None:
    with pytest.raises(ValueError, match="cotangent_codec must be one of"):
        et.RecordOptions(cotangent_codec="ce")


@pytest.mark.fallback
def test_a_failing_codec_leaves_the_run_recorded_with_the_tensor_codec(monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("explaind_trace.encoder.encode_cotangent", broken)
    generic, _ = _mlp_run("generic")
    auto, _ = _mlp_run("auto")
    assert "the cotangent codec failed (RuntimeError: boom)" in caplog.text
    with et.open_trace(generic) as g, et.open_trace(auto) as a:
        assert a.finished and a.num_steps == g.num_steps
        for t in range(a.num_steps):
            fa, fg = a.step(t).forwards[0], g.step(t).forwards[0]
            assert _raw(fa.cotangent) == _raw(fg.cotangent)
