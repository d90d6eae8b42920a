"""examples/modular_addition in a reduced configuration: record, kernel, grokking analysis."""

from __future__ import annotations

import csv
import json

import pytest

from .conftest import FP32_REL, assert_complete, load_script

train = load_script("modular_addition", "train")
analyze = load_script("modular_addition", "analyze")

SMALL = [
    "--p",
    "11",
    "--d-model",
    "16",
    "--d-mlp",
    "32",
    "--steps",
    "30",
    "--batch-size",
    "16",
    "--eval-every",
    "5",
    "--checkpoint-every",
    "10",
    "--no-progress",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("modadd")
    summary = train.main([*SMALL, "--out", str(out)])
    assert summary["steps"] == 30 and summary["trace_bytes"] > 0
    return out


def test_train_writes_trace_history_and_config(run_dir) -> None:
    assert (run_dir / "trace.lmdb").is_dir()
    with open(run_dir / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(0, 31, 5))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["p"] == 11 and config["batch"] == 16


def test_train_refuses_to_overwrite(run_dir) -> None:
    with pytest.raises(SystemExit, match="--overwrite"):
        train.main([*SMALL, "--out", str(run_dir)])


def test_analyze_is_exact_and_groups_add_up(run_dir, capsys) -> None:
    summary = analyze.main(
        [
            "--run",
            str(run_dir),
            "--n-test",
            "4",
            "--step-windows",
            "5",
            "--align-every",
            "5",
            "--no-progress",
        ]
    )
    assert summary["steps"] == 30 and summary["n_test"] == 4
    assert_complete(summary["completeness_max_abs"], summary["max_abs_fT"])
    # embeddings + heads (slices) + MLP + unembedding partition the parameters; the slices
    # are contracted in fp32 separately from the whole tensors, hence fp32 rounding
    assert summary["groups_match_path"] <= FP32_REL * summary["max_abs_fT"]
    assert len(summary["dominant_component_by_window"]) == 5
    out = run_dir / "analysis"
    for name in (
        "report/report.html",
        "grokking.png",
        "grokking.json",
        "alignment.csv",
        "components_by_window.csv",
        "kernel_phases.csv",
        "result.explaind",
    ):
        assert (out / name).is_file(), name
    align = (out / "alignment.csv").read_text().splitlines()
    assert align[0] == "step,best_abs_cos,cka" and len(align) == 1 + 7  # steps 0,5,…,25 and 30
    assert "completeness: max_abs=" in capsys.readouterr().out


def test_examples_model_reexports_the_library_model() -> None:
    from explaind_attr.app.demo import model as library

    example = load_script("modular_addition", "model")
    assert example.ModularAdditionTransformer is library.ModularAdditionTransformer
    assert example.make_dataset is library.make_dataset
