"""reforward runs a recorded forward again bit for bit, and leaves the user's model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explaind_trace as et
from explaind_trace.errors import TraceMismatchError
from explaind_trace.reforward import reforward
from tests.trace import trace_helpers as th


class DropoutCNN(nn.Module):
    """conv → batch norm → ReLU → dropout → pool → linear (a head submodule for output=)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(self.drop(torch.relu(self.bn(self.conv(x)))), 2)
        return self.head(h.flatten(1))


def _run(kind: str, store: str, *, output: str | None = None):
    """Train a few steps (accumulation 2 on the CNN, an eval-mode no_grad forward between
    steps); returns the model and the output of every grad-enabled forward, in order (a
    user's hooks run in a reforward too, as they ran in training: this one is removed)."""
    torch.manual_seed(0)
    if kind == "mlp":
        model: nn.Module = th.MLP(bn=False, p=0.3)
        x = torch.randn(32, 6)
    else:
        model = DropoutCNN()
        x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen: list[torch.Tensor] = []
    where = model.get_submodule(output) if output else model
    keep = where.register_forward_hook(
        lambda m, a, o: seen.append(o.detach().clone()) if torch.is_grad_enabled() else None
    )
    accumulate = 2 if kind == "cnn" else 1
    with et.record(model, opt, store=store, checkpoint_every=3, output=output):
        for step in range(6):
            opt.zero_grad()
            for j in range(accumulate):
                idx = torch.arange(8) + 8 * ((2 * step + j) % 4)
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) / accumulate
                loss.backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                model(x[:4])
            model.train()
    keep.remove()
    return model, seen


@pytest.mark.parametrize(
    "kind,output", [("mlp", None), ("cnn", None), ("cnn", "head")], ids=["mlp", "cnn", "cnn-out"]
)
@pytest.mark.parametrize("grad", [False, True])
def test_reforward_gives_the_recorded_output_bitwise(kind: str, output: str | None, grad) -> None:
    store = f"memory://{th.unique(kind)}"
    model, seen = _run(kind, store, output=output)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    rng_before = torch.get_rng_state()
    model.train(False)
    model.get_submodule("drop").train(True)  # flags the replay must restore
    got = []
    with et.open_trace(store) as trace:
        buffers = trace.checkpoint(0).buffers
        for rs in trace.replay(with_state=False):
            params = {n: p.clone().requires_grad_(grad) for n, p in rs.params.items()}
            for fwd in rs.record.forwards:
                if fwd.buffers is not None:
                    buffers = fwd.buffers
                before = {n: b.clone() for n, b in buffers.items()}
                out = reforward(model, params, buffers, fwd, output_module=output, grad=grad)
                assert out.requires_grad == grad
                got.append(out.detach())
                for n, b in buffers.items():  # the caller's buffers are not updated
                    assert torch.equal(b, before[n]), n
    assert len(got) == len(seen) == (12 if kind == "cnn" else 6)
    for i, (a, b) in enumerate(zip(got, seen)):
        assert torch.equal(a, b), i
    # the user's model: parameters, buffers, flags untouched; the global RNG restored
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers_before[n]), n
    assert not model.training and model.drop.training
    assert all(not m.training for name, m in model.named_modules() if name != "drop")
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_reforward_names_a_missing_output_module() -> None:
    store = f"memory://{th.unique()}"
    model, _ = _run("cnn", store, output="head")
    with et.open_trace(store) as trace:
        fwd = trace.step(0).forwards[0]
        params = trace.checkpoint(0).params
        buffers = trace.checkpoint(0).buffers
    with pytest.raises(TraceMismatchError, match="output module 'nohead', which this model"):
        reforward(model, params, buffers, fwd, output_module="nohead", grad=False)
    hooks = len(model.head._forward_hooks)
    out = reforward(model, params, buffers, fwd, output_module="head", grad=False)
    assert out.shape == (8, 3) and len(model.head._forward_hooks) == hooks  # hook removed
