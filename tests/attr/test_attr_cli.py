"""The `explaind` command line: help, error mapping, and the kernel/report plumbing."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import explaind_attr.app.cli as cli
import explaind_kernel
from explaind_kernel.result import KernelResult

REPO = Path(__file__).resolve().parents[2]


def _run(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "explaind_attr.app.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_the_subcommands():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("info", "kernel", "report", "demo"):
        assert command in proc.stdout
    proc = _run("kernel", "--help")
    assert proc.returncode == 0 and "--model" in proc.stdout and "--nodes" in proc.stdout


def test_library_error_is_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.explaind"
    bad.write_bytes(b"not msgpack \xc1")
    proc = _run("report", "some.lmdb", "--result", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert (
        lines[0].startswith("explaind: error: ")
        and "not a readable ExPLAIND kernel result" in lines[0]
    )


def test_bad_model_module_maps_to_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = cli.main(["kernel", "t.lmdb", "--model", "no_such_module_xyz:make", "--inputs", "x.npy"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot import module 'no_such_module_xyz' for --model" in err[0]
    assert cli.main(["kernel", "t.lmdb", "--model", "nocolon", "--inputs", "x.npy"]) == 2
    assert "must look like MODULE:NAME" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    from explaind_attr import UsageError

    with pytest.raises(UsageError, match="cannot import module"):
        cli.main(["--debug", "kernel", "t", "--model", "no_such_module_xyz:f", "--inputs", "x.npy"])


def test_info_calls_describe_and_format_info(capsys, monkeypatch):
    fake = types.ModuleType("explaind_trace.info")
    fake.describe = lambda path: {"path": path}
    fake.format_info = lambda info: f"trace at {info['path']}"
    monkeypatch.setitem(sys.modules, "explaind_trace.info", fake)
    assert cli.main(["info", "runs/a.lmdb"]) == 0
    assert capsys.readouterr().out == "trace at runs/a.lmdb\n"


def test_demo_prints_report_path_and_completeness_line(capsys, tmp_path, monkeypatch):
    import types

    import explaind_attr.app.demo as demo

    seen = []
    summary = types.SimpleNamespace(
        report=tmp_path / "report.html",
        steps=12,
        train_accuracy=1.0,
        test_accuracy=0.5,
        seconds={"record": 1.0, "kernel": 2.0, "total": 3.5},
        completeness_line="completeness: max_abs=1.000e-06 rel=2.000e-07",
    )
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.append((out, kw)) or summary)
    assert cli.main(["demo", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    assert seen == [(str(tmp_path), {"quick": True, "progress": False})]
    assert cli.main(["demo", "--out", str(tmp_path), "--cpu-threads", "2"]) == 0
    assert seen[-1] == (str(tmp_path), {"quick": False, "threads": 2})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"report: {tmp_path / 'report.html'}"
    assert out[1].endswith("in 4 s")
    assert out[-1] == "completeness: max_abs=1.000e-06 rel=2.000e-07"


_USER_MODULE = """
import numpy as np
import torch

def make_model():
    return torch.nn.Linear(2, 3)

def inputs():
    return torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])

def not_a_model():
    return 3
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch, synth):
    """A working directory with a user module, and a fake engine recording its call."""
    (tmp_path / "usermod_attr_cli.py").write_text(_USER_MODULE)
    np.save(tmp_path / "x.npy", np.zeros((4, 2), dtype=np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "usermod_attr_cli", raising=False)
    calls = []

    def fake_compute_kernel(trace, model, inputs, **kw):
        calls.append((trace, model, inputs, kw))
        return synth(N=int(inputs.shape[0]), O=3, trace_id="trace-A")

    monkeypatch.setattr(explaind_kernel, "compute_kernel", fake_compute_kernel)
    return tmp_path, calls


def test_kernel_command_saves_and_prints_one_line(user_dir, capsys):
    tmp_path, calls = user_dir
    code = cli.main(
        [
            "kernel",
            "run.lmdb",
            "--model",
            "usermod_attr_cli:make_model",
            "--inputs",
            "usermod_attr_cli:inputs",
            "--outputs",
            "label",
            "--nodes",
            "3",
            "--kink-splits",
            "16",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"result: {Path('run.lmdb.result.explaind')}"
    assert len(out) == 2 and out[1].startswith("completeness: max_abs=") and " rel=" in out[1]
    (trace, model, inputs, kw) = calls[0]
    assert trace == "run.lmdb" and tuple(inputs.shape) == (4, 2)
    assert kw["quadrature"] == "gauss:3" and kw["outputs"] == "label" and kw["device"] is None
    assert kw["kink_splits"] == 16 and kw["cpu_threads"] == "auto" and kw["dtype"] == "float32"
    assert kw["keep"] == explaind_kernel.KeepOptions()
    assert kw["labels"].tolist() == [0, 1, 2, 0]
    saved = KernelResult.load(tmp_path / "run.lmdb.result.explaind")
    assert saved.trace_id == "trace-A"


def test_kernel_command_input_errors(user_dir, capsys):
    base = ["kernel", "run.lmdb", "--model", "usermod_attr_cli:make_model"]
    assert cli.main([*base, "--inputs", "x.npy", "--outputs", "label"]) == 2
    assert "--outputs label needs labels" in capsys.readouterr().err
    assert cli.main([*base, "--inputs", "missing.npy"]) == 2
    assert "cannot read --inputs from 'missing.npy'" in capsys.readouterr().err
    assert (
        cli.main(["kernel", "r", "--model", "usermod_attr_cli:not_a_model", "--inputs", "x.npy"])
        == 2
    )
    assert "returned a int, not a torch.nn.Module" in capsys.readouterr().err
    assert cli.main(["kernel", "r", "--model", "usermod_attr_cli:nope", "--inputs", "x.npy"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err


def test_report_command_uses_a_matching_result(user_dir, capsys, monkeypatch, synth):
    tmp_path, calls = user_dir
    monkeypatch.setattr(cli, "_trace_id", lambda trace: "trace-A")
    monkeypatch.setattr(cli, "_samples_from_trace", lambda trace, ids: None)
    saved = synth(trace_id="trace-A").save(tmp_path / "r.explaind")
    assert cli.main(["report", "run.lmdb", "--result", str(saved), "--out", "rep"]) == 0
    assert not calls  # nothing recomputed
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"result: {saved} (saved)"
    assert out[1].startswith("completeness:") and (tmp_path / "rep" / "report.html").exists()
    # a result of another trace is not used: the kernel is computed again
    other = synth(trace_id="trace-B").save(tmp_path / "other.explaind")
    args = [
        "report",
        "run.lmdb",
        "--result",
        str(other),
        "--out",
        "rep2",
        "--model",
        "usermod_attr_cli:make_model",
        "--inputs",
        "x.npy",
    ]
    assert cli.main(args) == 0
    assert len(calls) == 1
    assert "comes from trace 'trace-B'" in capsys.readouterr().err
    assert (tmp_path / "rep2" / "result.explaind").exists()
    # no usable result and no model: a clean error
    assert cli.main(["report", "run.lmdb", "--result", str(other)]) == 2
    assert "needs --model MODULE:FACTORY and --inputs" in capsys.readouterr().err


def test_package_exports_lazily():
    import explaind_attr

    assert set(explaind_attr.__all__) == set(explaind_attr._OWNER) | {
        n for n in explaind_attr.__all__ if n.endswith("Error")
    }
    for name in explaind_attr.__all__:
        assert getattr(explaind_attr, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        explaind_attr.nope  # noqa: B018
    code = "import sys, explaind_attr.app.cli; print(sorted({'torch', 'pandas', 'matplotlib'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_kernel_flags_reach_the_engine(user_dir, capsys):
    tmp_path, calls = user_dir
    np.savez(tmp_path / "xy.npz", x=np.ones((4, 2), np.float32), y=np.array([2, 1, 0, 1]))
    args = ["kernel", "run.lmdb", "--model", "usermod_attr_cli:make_model", "--inputs", "xy.npz"]
    extra = ["--keep", "sample_window,param_scores", "--cpu-threads", "3", "--dtype", "float64"]
    assert cli.main([*args, *extra, "--out", "r.explaind"]) == 0
    kw = calls[-1][3]
    assert kw["keep"] == explaind_kernel.KeepOptions(
        sample_window=True, component_window=False, param_scores=True
    )
    assert kw["cpu_threads"] == 3 and kw["dtype"] == "float64"
    assert kw["labels"].tolist() == [2, 1, 0, 1] and calls[-1][2].sum() == 8
    assert capsys.readouterr().out.splitlines()[0] == "result: r.explaind"
    assert cli.main([*args, "--keep", "all"]) == 0
    assert calls[-1][3]["keep"].sample_component and calls[-1][3]["keep"].param_scores
    assert cli.main([*args, "--keep", "samples"]) == 2
    assert "--keep 'samples': unknown slice(s) ['samples']" in capsys.readouterr().err
    assert cli.main([*args, "--cpu-threads", "0"]) == 2
    assert "--cpu-threads must be ≥ 1" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", inputs=np.ones((4, 2)))
    assert cli.main([*args[:-1], "bad.npz"]) == 2
    assert "holds arrays ['inputs'] but no 'x'" in capsys.readouterr().err


def test_report_finds_the_result_kernel_wrote(user_dir, capsys, monkeypatch):
    tmp_path, calls = user_dir
    monkeypatch.setattr(cli, "_trace_id", lambda trace: "trace-A")
    monkeypatch.setattr(cli, "_problem_digest", lambda *a: "digest-of-x")
    monkeypatch.setattr(cli, "_samples_from_trace", lambda trace, ids: None)
    args = ["--model", "usermod_attr_cli:make_model", "--inputs", "x.npy"]
    assert cli.main(["kernel", "run.lmdb", *args]) == 0
    assert len(calls) == 1
    capsys.readouterr()
    assert cli.main(["report", "run.lmdb", "--out", "rep"]) == 0  # no --model: the saved one
    assert len(calls) == 1
    assert capsys.readouterr().out.splitlines()[0] == "result: run.lmdb.result.explaind (saved)"
    # the same question is answered by the saved result; another one is recomputed
    saved = KernelResult.load(tmp_path / "run.lmdb.result.explaind")
    saved.config = explaind_kernel.KernelConfig(progress=False).to_dict()
    saved.extra["inputs_digest"] = "digest-of-x"
    saved.save(tmp_path / "run.lmdb.result.explaind")
    assert cli.main(["report", "run.lmdb", "--out", "rep", "--no-progress", *args]) == 0
    assert len(calls) == 1
    assert cli.main(["report", "run.lmdb", "--out", "rep", "--nodes", "3", *args]) == 0
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert "not using run.lmdb.result.explaind: its kernel configuration differs" in err
    assert cli.main(["report", "other.lmdb"]) == 2
    assert "no kernel result for other.lmdb at other.lmdb.result.explaind" in (
        capsys.readouterr().err
    )


def test_every_explaind_error_is_one_line(monkeypatch, capsys):
    from explaind_trace.errors import ExplaindError

    class Custom(ExplaindError):
        pass

    def boom(args):
        raise Custom("something went wrong\n  over two lines")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    assert cli.main(["info", "x"]) == 2
    assert capsys.readouterr().err == "explaind: error: something went wrong over two lines\n"

    def user_bug(args):
        raise ValueError("the user's own code")

    monkeypatch.setattr(cli, "_cmd_info", user_bug)
    with pytest.raises(ValueError, match="the user's own code"):
        cli.main(["info", "x"])


def test_python_m_explaind_kernel_is_the_kernel_verb():
    proc = subprocess.run(
        [sys.executable, "-m", "explaind_kernel", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout and "--keep" in proc.stdout and "--cpu-threads" in proc.stdout


def test_self_influence_option_ranks_and_writes_csv(tmp_path, monkeypatch, capsys):
    import torch
    from torch import nn

    import explaind_trace

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    store = str(tmp_path / "run.lmdb")
    with explaind_trace.record(model, opt, store=store) as rec:
        for t in range(3):
            idx = torch.arange(2 * t, 2 * t + 2)
            rec.set_sample_ids(idx)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    (tmp_path / "usermod_selfinf.py").write_text(
        "import torch\n\ndef make_model():\n    return torch.nn.Linear(3, 2)\n"
    )
    np.save(tmp_path / "y.npy", y.numpy())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    args = ["kernel", store, "--model", "usermod_selfinf:make_model", "--self-influence"]
    assert cli.main([*args, "--labels", "y.npy", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"self-influence: {tmp_path / 'run.lmdb.self_influence.csv'}"
    assert out[1].startswith("completeness:") and "self_influence" in out[2]
    import pandas as pd

    table = pd.read_csv(tmp_path / "run.lmdb.self_influence.csv")
    assert sorted(table["sample"]) == list(range(6)) and table["rank"].tolist() == list(range(1, 7))
    assert set(table["output"]) == {"loss (cross-entropy)"}
    assert cli.main(["kernel", store, "--model", "usermod_selfinf:make_model"]) == 2
    assert "needs --inputs (or --self-influence)" in capsys.readouterr().err


def test_kernel_then_report_on_a_real_trace(tmp_path, monkeypatch, capsys):
    """No fakes: explaind kernel prints the path it wrote, explaind report TRACE finds that
    result (same inputs: reused; other labels: recomputed, saying why)."""
    import torch
    from torch import nn

    import explaind_trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    store = str(tmp_path / "run.lmdb")
    with explaind_trace.record(model, opt, store=store):
        for _ in range(4):
            opt.zero_grad()
            x = torch.randn(4, 3)
            nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 1])).backward()
            opt.step()
    (tmp_path / "usermod_e2e.py").write_text(
        "import torch\n\ndef make_model():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), "
        "torch.nn.Linear(4, 3))\n"
    )
    np.savez(tmp_path / "t.npz", x=np.ones((2, 3), np.float32), y=np.array([2, 0]))
    np.save(tmp_path / "other_y.npy", np.array([1, 1]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    args = ["--model", "usermod_e2e:make_model", "--inputs", "t.npz", "--outputs", "loss"]
    assert cli.main(["kernel", store, *args, "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"result: {store}.result.explaind"
    assert cli.main(["report", store, "--out", "rep"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"result: {store}.result.explaind (saved)"
    assert cli.main(["report", store, "--out", "rep", *args]) == 0
    assert "(saved)" in capsys.readouterr().out
    assert cli.main(["report", store, "--out", "rep", *args, "--labels", "other_y.npy"]) == 0
    captured = capsys.readouterr()
    assert "other test inputs or targets" in captured.err
    assert captured.out.splitlines()[0] == f"result: {Path('rep') / 'result.explaind'}"
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "test input 0, label 1" in html and "loss (cross-entropy)" in html
