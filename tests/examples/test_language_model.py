"""examples/language_model in its reduced configuration (--small): a tiny GPT-2 trained by
the Hugging Face Trainer while recorded, the loss of held-out sentences explained exactly,
checked against the real model at θ_T, and the report rendered in a real browser."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import explaind_trace as et  # noqa: E402
from examples.language_model import __main__ as cli  # noqa: E402
from examples.language_model.corpus import IGNORE, Language, sequence_loss  # noqa: E402
from explaind_trace.cotangent_codec import DeferredCotangent  # noqa: E402

from .conftest import FP32_REL, assert_complete  # noqa: E402
from .test_demo import _browser, rendered  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The example as it ships: recompute mode, loss-aware cotangent codec."""
    out = tmp_path_factory.mktemp("lm")
    summary = cli.main(["--small", "--out", str(out), "--no-progress"])
    return out, summary["train"], summary["analyze"]


def _load(out):
    from explaind_kernel import KernelResult

    return KernelResult.load(out / "analysis" / "result.explaind")


def test_the_trainer_run_is_recorded_with_the_lm_head_output(run) -> None:
    out, trained, _ = run
    with et.open_trace(str(out / "trace.lmdb")) as trace:
        assert trace.finished and trace.error is None
        assert trace.num_steps == trained["steps"] == 6
        assert trace.meta.output_module == "lm_head"
        fwd = trace.step(0).forwards[0]
        # the Trainer's keyword inputs (and num_items_in_batch, the loss's normaliser)
        assert {"input_ids", "attention_mask", "labels"} <= set(fwd.kwargs)
        # the [B, L, V] logits' cotangent is stored by the loss-aware codec: the reader hands
        # out a deferred cotangent, rebuilt from the replayed logits
        assert isinstance(fwd.cotangent, DeferredCotangent)
        assert (fwd.kwargs["attention_mask"] == 0).any()  # padded sentences in the batches
        # recorded without gradients, cotangents by the loss-aware codec
        assert trace.meta.options.gradients == "recompute"
        assert trace.meta.options.cotangent_codec == "auto"
        kinds = trace.progress["kind_bytes"]
        assert kinds["gradients"] == 0
        vocab = json.loads((out / "config.json").read_text())["vocab_size"]
        logits = trained["steps"] * 4 * fwd.kwargs["input_ids"].numel() * vocab
        assert kinds["cotangents"] < 0.1 * logits  # vs fp32 (0.04× at this tiny size)
    assert trained["held_out_loss_after"] < trained["held_out_loss_before"]


def test_the_held_out_losses_are_explained_exactly(run) -> None:
    _, _, summary = run
    assert summary["steps"] == 6 and summary["n_explain"] == 2
    assert_complete(summary["completeness_max_abs"], summary["max_abs_fT"])
    # independent reference: the Hugging Face model itself at θ_T (float64) against
    # f_0 + Σ data + every term of the fp32 kernel
    assert summary["decomposition_vs_real_max_abs"] <= FP32_REL * summary["max_abs_fT"]
    # the training side reproduced the optimizer's gradient from the per-sentence parts
    # (dropout replayed, padding masked): what no sentence explains is rounding, here
    # relative to how far the losses moved
    moved = max(abs(v) for v in summary["loss_change"])
    for term in ("nondata", "residual"):
        assert summary["terms_max_abs"][term] <= FP32_REL * moved, term
    # embeddings + blocks + final norm partition the parameters: they add up to the path
    assert summary["layers"] == ["embeddings", "block 0", "block 1", "final norm"]
    assert summary["layers_match_path"] <= FP32_REL * moved
    # the data term per window, split by the held-out sentence's rule, adds up again
    assert summary["rule_split_matches_data"] <= FP32_REL * moved
    assert summary["training_routes"] == {"rules": 6}  # pinned by --small: GPT-2's rules hold


def test_recompute_and_codec_give_the_stored_runs_kernel_bit_for_bit(run, tmp_path) -> None:
    """The same run recorded with stored gradients and generic cotangents: every array of
    the kernel result is bitwise equal (θ_t and the cotangents are rebuilt exactly)."""
    out, _, _ = run
    stored = tmp_path / "stored"
    cli.main(
        ["--small", "--out", str(stored), "--no-progress", "--gradients", "stored"]
        + ["--cotangent-codec", "generic"]
    )
    with et.open_trace(str(stored / "trace.lmdb")) as trace:
        assert trace.progress["kind_bytes"]["gradients"] > 0
    a, b = _load(out), _load(stored)
    assert a.sample_ids == b.sample_ids and a.trace_id != b.trace_id
    compared = 0
    for name, value in vars(a).items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, getattr(b, name)), name
            compared += 1
    assert compared >= 15


def test_gradient_clipping_is_named_and_auto_mode_stays_exact(tmp_path) -> None:
    """Why the example turns clipping off. Recomputed gradients cannot be the clipped ones:
    replay refuses the trace, naming the step and the cause. The auto mode stores gradients
    from there and the kernel is exact again, but the clipping correction is a non-data term
    larger than the whole change of the loss: nothing a training sentence explains."""
    from examples.language_model import analyze, train
    from explaind_trace.errors import GradientMismatchError

    clip = ["--small", "--no-progress", "--max-grad-norm", "0.1"]
    recompute = tmp_path / "recompute"
    train.main([*clip, "--out", str(recompute)])
    cfg = json.loads((recompute / "config.json").read_text())
    with et.open_trace(str(recompute / "trace.lmdb")) as trace:
        with pytest.raises(GradientMismatchError, match=r"step 0, .*gradient clipping"):
            trace.check_drift(model=train.model_of(cfg))
    auto = tmp_path / "auto"
    train.main([*clip, "--out", str(auto), "--gradients", "auto"])
    with et.open_trace(str(auto / "trace.lmdb")) as trace:
        assert trace.gradients_stored_from == 0
    summary = analyze.main(
        ["--run", str(auto), "--n-explain", "2", "--step-windows", "3", "--no-progress"]
    )
    assert_complete(summary["completeness_max_abs"], summary["max_abs_fT"])
    assert summary["decomposition_vs_real_max_abs"] <= FP32_REL * summary["max_abs_fT"]
    moved = max(abs(v) for v in summary["loss_change"])
    assert summary["terms_max_abs"]["nondata"] > moved


def test_the_outputs_are_written(run) -> None:
    out, _, summary = run
    analysis = out / "analysis"
    for name in ("report/report.html", "layers.png", "layers_by_window.csv", "result.explaind"):
        assert (analysis / name).is_file(), name
    rows = (analysis / "layers_by_window.csv").read_text().splitlines()
    assert rows[0].startswith("window_start,window_stop,embeddings,block 0")
    assert len(rows) == 1 + 3  # --step-windows 3
    saved = json.loads((analysis / "language_model.json").read_text())
    assert saved["completeness_line"] == summary["completeness_line"]
    assert len(saved["same_rule"]["share"]) == 2


def test_the_report_renders_in_a_real_browser(run) -> None:
    browser = _browser()
    out, _, summary = run
    report = out / "analysis" / "report" / "report.html"
    html = report.read_text(encoding="utf-8")
    assert summary["completeness_line"] in html
    assert "&lt;bos&gt;" in html  # training sentences shown as text
    images, loaded, text = rendered(browser, report)
    assert images == html.count("<img") and images >= 3
    assert loaded == images, f"{images - loaded} of {images} images did not load"
    assert text > 1000


def test_sequence_loss_is_the_models_own_loss() -> None:
    """The target equals Hugging Face's causal-LM loss of each sentence on its own."""
    import torch
    import transformers

    from examples.language_model.corpus import Sentences

    lang = Language(numbers=12, context=12)
    data = Sentences(lang, 3, seed=5)
    cfg = transformers.GPT2Config(
        vocab_size=lang.vocab_size, n_positions=12, n_embd=16, n_layer=1, n_head=2
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        out = model(input_ids=data.ids, attention_mask=data.mask)
        got = sequence_loss(out.logits, data.labels)
        for i in range(3):
            one = model(
                input_ids=data.ids[i : i + 1],
                attention_mask=data.mask[i : i + 1],
                labels=data.labels[i : i + 1],
            )
            assert float(got[i]) == pytest.approx(float(one.loss), rel=1e-6)
    assert (data.labels == IGNORE).any() and np.all(data.mask.sum(1).numpy() >= 8)
