"""Label-aware targets: "loss", "margin", "label", callables fn(output, labels), and the ways
labels come with the test inputs (explaind_kernel/targets.py, inputs.py).

References: the real target recomputed on the trained model at θ_T (completeness, fp32
tolerance of test_completeness.py), and the float64 brute force of reference.py with the
loss written independently through torch.nn.functional.cross_entropy (1e-9, as
test_bruteforce.py: two summation orders of the same float64 numbers).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import explaind_kernel
from explaind_kernel import InputError, compute_kernel, register_target, registered_targets

from .models import SETUPS, KernelSetup, train
from .reference import Setup, TinyMLP, run_setup
from .test_bruteforce import close

FP32_REL = 1e-4  # as test_completeness.py: fp32 rounding over ~200 swept steps
STEPS = 60  # each setup's run, shortened: three targets each, and completeness is per step


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def _margin_reference(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the logsumexp of the others, built by removing the column."""
    rows = []
    for i in range(out.shape[0]):
        keep = [c for c in range(out.shape[1]) if c != int(y[i])]
        rows.append(out[i, y[i]] - torch.logsumexp(out[i, keep], dim=0))
    return torch.stack(rows)


def _prob_of_label(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user's callable: the softmax probability of the label."""
    return out.softmax(-1).gather(-1, y[:, None])[:, 0]


TARGETS = {
    "loss": ("loss", _ce),
    "margin": ("margin", _margin_reference),
    "callable": (_prob_of_label, _prob_of_label),
}


@pytest.fixture(scope="module")
def trained():
    """Each setup trained once: (fresh model, test inputs, trained model, test labels)."""
    out = {}
    for setup in SETUPS:
        store = f"memory://targets-{setup.name}"
        fresh, test_x, model = train(dataclasses.replace(setup, steps=STEPS), store)
        labels = torch.tensor([0, 1, 1]) if setup.name == "cnn_bn_sgd" else torch.tensor([2, 0, 1])
        out[setup.name] = (store, fresh, test_x, model, labels)
    return out


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
def test_completeness_against_the_real_target(trained, setup: KernelSetup, target: str) -> None:
    store, fresh, test_x, model, labels = trained[setup.name]
    spec, reference = TARGETS[target]
    res = compute_kernel(store, fresh, test_x, outputs=spec, labels=labels, progress=False)
    model.eval()
    with torch.no_grad():
        actual = reference(model(test_x), labels).double().numpy()[:, None]
    assert res.fT.shape == (3, 1)
    scale = np.max(np.abs(actual))
    np.testing.assert_allclose(res.fT, actual, rtol=0, atol=1e-5 * scale)
    assert np.max(np.abs(res.completeness_residual)) <= FP32_REL * scale
    change = np.max(np.abs(res.fT - res.f0))
    assert np.max(np.abs(res.data_total)) > 0.1 * change  # the data carry the change
    assert res.extra["labels"].tolist() == labels.tolist()
    assert res.extra["target"] == (target if target != "callable" else "_prob_of_label")


def test_loss_matches_the_bruteforce_per_sample_component_and_step() -> None:
    test_x = torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    test_y = torch.tensor([2, 0, 1])
    setup = Setup("adamw_loss", lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1))
    store = "memory://targets-bruteforce-loss"
    _, ref = run_setup(setup, store, test_x, nodes=2, target=lambda out: _ce(out, test_y))
    res = compute_kernel(
        store, TinyMLP().double(), test_x, outputs="loss", labels=test_y, dtype="float64",
        progress=False,
    )  # fmt: skip
    assert res.output_names == ["loss (cross-entropy)"]
    close(res.f0, ref.f0)
    close(res.fT, ref.fT)
    scale = max(np.max(np.abs(v)) for v in ref.data.values())
    for j, sid in enumerate(res.sample_ids):
        assert np.max(np.abs(res.data[:, :, j] - ref.data[sid])) <= 1e-9 * scale, sid
    assert set(res.sample_ids) == set(ref.data)
    close(res.step_data, ref.step_data)
    for c, name in enumerate(res.component_names):
        close(res.component_data[:, :, c], ref.component_data[name])
    close(res.weight_decay, ref.weight_decay)
    assert np.max(np.abs(res.completeness_residual)) <= 1e-12 * np.max(np.abs(res.fT))


@pytest.fixture(scope="module")
def small():
    """A 10-step float64 run of the brute-force MLP (cheap), and test inputs with labels."""
    store = "memory://targets-small"
    test_x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    run_setup(Setup("small", lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9)), store, test_x)
    return store, test_x, torch.tensor([0, 2, 1, 2])


def _equal(a, b) -> None:
    for name in ("f0", "fT", "data", "step_data", "components", "component_data", "residual"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_margin_by_name_equals_margin_by_callable_bitwise(small) -> None:
    store, x, y = small

    def my_margin(out, labels):  # the documented formula, written by a user
        classes = torch.arange(out.shape[-1], device=out.device)
        picked = out.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        others = out.masked_fill(classes == labels.long().unsqueeze(-1), -float("inf"))
        return picked - torch.logsumexp(others, dim=-1)

    # one fixed training route: "auto" picks a route by timing, and routes agree to rounding
    kw = dict(labels=y, dtype="float64", progress=False, training_mode="per_sample")
    named = compute_kernel(store, TinyMLP().double(), x, outputs="margin", **kw)
    mine = compute_kernel(store, TinyMLP().double(), x, outputs=my_margin, **kw)
    _equal(named, mine)
    assert named.output_names == ["margin"] and mine.output_names == ["my_margin"]


def test_labels_come_with_the_inputs(small) -> None:
    store, x, y = small
    kw = dict(outputs="loss", dtype="float64", progress=False, training_mode="per_sample")
    base = compute_kernel(store, TinyMLP().double(), x, labels=y, **kw)
    ds = torch.utils.data.TensorDataset(x, y)
    for inputs in (
        (x, y),
        (x.numpy(), y.numpy()),
        ds,
        torch.utils.data.DataLoader(ds, batch_size=3),
    ):
        _equal(base, compute_kernel(store, TinyMLP().double(), inputs, **kw))
    # labels= wins over those of the inputs; numpy labels work as well
    flipped = compute_kernel(store, TinyMLP().double(), (x, 2 - y), labels=y.numpy(), **kw)
    _equal(base, flipped)
    assert base.extra["inputs_digest"] == flipped.extra["inputs_digest"]
    other = compute_kernel(store, TinyMLP().double(), x, labels=2 - y, **kw)
    assert other.extra["inputs_digest"] != base.extra["inputs_digest"]


def test_a_callable_gets_each_chunks_labels_aligned(small) -> None:
    store, x, y = small
    seen = []

    def label_logit(out, labels):
        seen.append(labels.shape)
        return out.gather(-1, labels[:, None])[:, 0]

    # a tiny memory budget: chunks of one input each
    res = compute_kernel(
        store, TinyMLP().double(), x, outputs=label_logit, labels=y, dtype="float64",
        memory_budget=1, progress=False,
    )  # fmt: skip
    ref = compute_kernel(
        store, TinyMLP().double(), x, outputs="label", labels=y, dtype="float64", progress=False
    )
    np.testing.assert_allclose(res.fT, ref.fT, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.data, ref.data, rtol=0, atol=1e-12)
    # one-argument callables keep working (no labels)
    first = compute_kernel(
        store, TinyMLP().double(), x, outputs=lambda out: out[:, 0], dtype="float64",
        progress=False,
    )  # fmt: skip
    allout = compute_kernel(store, TinyMLP().double(), x, dtype="float64", progress=False)
    np.testing.assert_allclose(first.fT[:, 0], allout.fT[:, 0], rtol=0, atol=1e-12)


def test_loss_of_a_log_softmax_model_is_the_nll() -> None:
    class LogSoftmaxMLP(TinyMLP):
        def forward(self, x):
            return super().forward(x).log_softmax(-1)

    test_x = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([1, 1, 0])
    store = "memory://targets-logsoftmax"
    torch.manual_seed(0)
    model = LogSoftmaxMLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 3, (8,), generator=gen)
    import explaind_trace

    with explaind_trace.record(model, opt, store=store):
        for _ in range(6):
            opt.zero_grad()
            nn.functional.nll_loss(model(X), Y).backward()
            opt.step()
    res = compute_kernel(
        store, LogSoftmaxMLP().double(), test_x, outputs="loss", labels=y, dtype="float64",
        progress=False,
    )  # fmt: skip
    assert res.output_names == ["loss (nll)"]
    with torch.no_grad():
        actual = nn.functional.nll_loss(model(test_x), y, reduction="none").numpy()
    np.testing.assert_allclose(res.fT[:, 0], actual, rtol=0, atol=1e-12)
    assert np.max(np.abs(res.completeness_residual)) <= 1e-10 * np.max(np.abs(res.fT))


def test_bad_labels_and_targets_are_refused(small) -> None:
    store, x, y = small
    kw = dict(dtype="float64", progress=False)
    m = TinyMLP().double

    with pytest.raises(InputError, match="labels has 3 rows for 4 test inputs"):
        compute_kernel(store, m(), x, outputs="loss", labels=y[:3], **kw)
    with pytest.raises(InputError, match=r"labels\[2\] = 5 is out of range for 3 classes"):
        compute_kernel(store, m(), x, outputs="margin", labels=torch.tensor([0, 1, 5, 2]), **kw)
    with pytest.raises(InputError, match=r"labels\[1\] = -1 is out of range"):
        compute_kernel(store, m(), x, outputs="label", labels=[0, -1, 1, 2], **kw)
    with pytest.raises(InputError, match="needs integer class indices"):
        compute_kernel(store, m(), x, outputs="loss", labels=y.double(), **kw)
    with pytest.raises(InputError, match="outputs='margin' needs labels"):
        compute_kernel(store, m(), x, outputs="margin", **kw)
    with pytest.raises(InputError, match=r"not a registered target; use one of \['all', "):
        compute_kernel(store, m(), x, outputs="logits", **kw)
    with pytest.raises(InputError, match=r"returned \(\) for a chunk of 1 test input"):
        compute_kernel(store, m(), x, outputs=lambda out, lab: out.sum(), **kw)

    class Scalar(TinyMLP):
        def forward(self, x):
            return super().forward(x)[:, :1]

    with pytest.raises(InputError, match=r"'margin' needs class scores .* shape \(4, 1\)"):
        compute_kernel(store, Scalar().double(), x, outputs="margin", labels=y * 0, **kw)

    class Probabilities(TinyMLP):
        def forward(self, x):
            return super().forward(x).softmax(-1)

    with pytest.raises(InputError, match=r"lies in \[0, 1\] and sums to 1 \(probabilities\)"):
        compute_kernel(store, Probabilities().double(), x, outputs="loss", labels=y, **kw)


def test_registered_targets_extend_outputs(small) -> None:
    store, x, y = small
    assert {"all", "predicted", "label", "loss", "margin"} <= set(registered_targets())

    @register_target("label_minus_mean", replace_existing=True)
    def label_minus_mean(out, labels):
        return out.gather(-1, labels[:, None])[:, 0] - out.mean(-1)

    try:
        res = compute_kernel(
            store, TinyMLP().double(), x, outputs="label_minus_mean", labels=y, dtype="float64",
            progress=False,
        )  # fmt: skip
        assert res.output_names == ["label_minus_mean"]
        assert np.max(np.abs(res.completeness_residual)) <= 1e-10 * np.max(np.abs(res.fT))
        with pytest.raises(InputError, match="labels\\[0\\] = 9 is out of range"):
            compute_kernel(
                store, TinyMLP().double(), x, outputs="label_minus_mean",
                labels=torch.tensor([9, 0, 0, 0]), progress=False,
            )  # fmt: skip
        with pytest.raises(InputError, match="already registered"):
            register_target("label_minus_mean")(label_minus_mean)
    finally:
        explaind_kernel.targets._REGISTRY.pop("label_minus_mean", None)
