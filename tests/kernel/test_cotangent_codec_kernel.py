"""A run recorded with the cotangent codec gives the kernel the very results of the same
seeded run recorded with the generic codec: every numeric field of KernelResult bitwise
equal, for an MLP classifier and a per-token language model ([B, T, V] logits, padding).
The kernel computes in float64 here, while the cotangents are rebuilt from the recorded
float32 replay (float64 logits would not rebuild them)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import explaind_trace
from explaind_kernel import KeepOptions, KernelResult, compute_kernel
from explaind_trace import cotangent_codec as cc
from explaind_trace.errors import CotangentDecodeError
from explaind_trace.reforward import reforward

from .models import TokenLM

KEEP = KeepOptions(sample_component=True, sample_window=True, component_window=True)


class Classifier(nn.Module):
    def __init__(self, classes: int = 12) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _classifier_run(
    codec: str, store: str, gradients: str = "stored"
) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 12, (40,), generator=g)
    with explaind_trace.record(
        model, opt, store=store, cotangent_codec=codec, checkpoint_every=3, gradients=gradients
    ):
        for t in range(7):
            idx = torch.arange(8 * t, 8 * t + 8) % 40
            opt.zero_grad()
            for half in (idx[:4], idx[4:]):  # gradient accumulation: two forwards a step
                nn.functional.cross_entropy(model(x[half]), y[half], reduction="sum").backward()
            opt.step()
    return model, torch.randn(3, 5, generator=g)


def _lm_run(codec: str, store: str, gradients: str = "stored") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    model = TokenLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    corpus = torch.randint(0, 11, (12, 7), generator=g)
    with explaind_trace.record(
        model, opt, store=store, cotangent_codec=codec, checkpoint_every=4, gradients=gradients
    ):
        for t in range(6):
            seq = corpus[torch.arange(3 * t, 3 * t + 3) % 12]
            labels = seq[:, 1:].clone()
            labels[t % 3, -2:] = -100  # padding rows: zero cotangents
            logits = model(seq[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, torch.randint(0, 11, (2, 6), generator=g)


def _kernel(store: str, model: nn.Module, test_x: torch.Tensor, mode: str) -> KernelResult:
    return compute_kernel(
        store,
        model,
        test_x,
        dtype="float64",
        keep=KEEP,
        progress=False,
        training_mode=mode,
        cpu_threads=1,
    )


def _assert_same(g: KernelResult, a: KernelResult) -> None:
    x_all, y_all = _numeric(g), _numeric(a)
    assert x_all.keys() == y_all.keys()
    for key in x_all:
        x, y = x_all[key], y_all[key]
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key
        else:
            assert x == y, key


def _numeric(r: KernelResult) -> dict[str, object]:
    return {
        f.name: getattr(r, f.name)
        for f in dataclasses.fields(r)
        if isinstance(getattr(r, f.name), np.ndarray | dict | list)
        and f.name not in ("config", "extra")
    }


@pytest.mark.parametrize("mode", ["rules", "per_sample"])
@pytest.mark.parametrize("run", [_classifier_run, _lm_run])
def test_kernel_results_equal_the_generic_codecs_bitwise(run, mode: str) -> None:
    """(Routes and threads fixed: auto choices are timed, and a different route or thread
    count changes the summation order.)"""
    name = f"{run.__name__}-{mode}"
    model_g, test_x = run("generic", f"memory://codec-kernel-{name}-g")
    model_a, _ = run("auto", f"memory://codec-kernel-{name}-a")
    with explaind_trace.open_trace(f"memory://codec-kernel-{name}-a") as trace:
        deferred = [
            isinstance(f.cotangent, cc.DeferredCotangent)
            for t in range(trace.num_steps)
            for f in trace.step(t).forwards
        ]
        assert all(deferred) and deferred  # the kernel really had to rebuild them
        kinds = trace.progress["kind_bytes"]
        # the compute dtype's logits, rounded to float32, are not the recorded ones
        step = next(iter(trace.replay(0, 1)))
        fwd = step.record.forwards[0]
        wide = {k: v.double() for k, v in step.params.items()}
        bufs = trace.checkpoint(0).buffers
        out = reforward(model_a, wide, bufs, fwd, output_module=None, grad=False)
        with pytest.raises(CotangentDecodeError, match="does not match the recorded one"):
            fwd.cotangent.resolve(out.float())
    results = [
        _kernel(store, model, test_x, mode)
        for store, model in (
            (f"memory://codec-kernel-{name}-g", model_g),
            (f"memory://codec-kernel-{name}-a", model_a),
        )
    ]
    _assert_same(*results)
    assert results[0].trace_id != results[1].trace_id  # two traces, one answer
    assert kinds["cotangents"] > 0


@pytest.mark.parametrize("run", [_classifier_run, _lm_run])
def test_recompute_with_the_codec_equals_stored_gradients_with_the_generic_codec(run) -> None:
    """No gradient and no cotangent stored as such: the recompute replay rebuilds each
    cotangent from its own reforward, then the gradient; the kernel's results are those of
    the stored, generic recording, bit for bit."""
    name = f"{run.__name__}-recompute"
    model_g, test_x = run("generic", f"memory://codec-kernel-{name}-g")
    model_a, _ = run("auto", f"memory://codec-kernel-{name}-a", gradients="recompute")
    with explaind_trace.open_trace(f"memory://codec-kernel-{name}-a") as trace:
        assert trace.progress["kind_bytes"]["gradients"] == 0
        assert isinstance(trace.step(1).forwards[0].cotangent, cc.DeferredCotangent)
    _assert_same(
        _kernel(f"memory://codec-kernel-{name}-g", model_g, test_x, "per_sample"),
        _kernel(f"memory://codec-kernel-{name}-a", model_a, test_x, "per_sample"),
    )
