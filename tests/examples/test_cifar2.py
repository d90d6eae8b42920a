"""examples/cifar2 on synthetic data in a reduced configuration: kernel, report, pruning."""

from __future__ import annotations

import json

import pytest

from .conftest import assert_complete, load_script

train = load_script("cifar2", "train")
analyze = load_script("cifar2", "analyze")
cifar_data = load_script("cifar2", "cifar_data")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar2")
    summary = train.main(
        [
            "--synthetic",
            "--out",
            str(out),
            "--n-train",
            "64",
            "--n-test",
            "40",
            "--width",
            "4",
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert summary["steps"] == 6 and summary["trace_bytes"] > 0
    return out


def test_analyze_is_exact_and_prunes_three_ways(run_dir) -> None:
    sparsities = ["0", "0.5", "0.9"]
    summary = analyze.main(
        [
            "--run",
            str(run_dir),
            "--n-explain",
            "4",
            "--step-windows",
            "3",
            "--taylor-batch",
            "32",
            "--sparsities",
            *sparsities,
            "--no-progress",
        ]
    )
    assert_complete(summary["completeness_max_abs"], summary["max_abs_fT"])
    assert summary["n_eval"] == 36
    out = run_dir / "analysis"
    curves = json.loads((out / "pruning.json").read_text())
    assert set(curves) == {"scores", "magnitude", "taylor"}
    assert all(len(c) == 3 for c in curves.values())
    # nothing pruned: the same model, the same accuracy
    assert len({c["0.0"] for c in curves.values()}) == 1
    assert all(name.endswith("weight") for name in summary["pruned_tensors"])
    assert (out / "pruning.png").is_file() and (out / "report" / "report.html").is_file()
    assert (out / "report" / "top_samples.png").is_file()  # training images in the report


def test_real_cifar_needs_the_files_and_says_how_to_get_them(tmp_path) -> None:
    with pytest.raises(SystemExit, match="--synthetic"):
        cifar_data.load_cifar2(str(tmp_path), (3, 5), train=True)
