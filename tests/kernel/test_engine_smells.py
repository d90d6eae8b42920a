"""Regression tests for the kernel's structural smells (issue 11), each on a short float64 run.

- options next to config= are refused in every entry point (single-process, sharded, compare);
- the sharded path runs under the same thread and TF32 settings as the single-process one;
- a sharded run where a rank holds no segment, with every KeepOptions field (param_scores
  included), equals the single-process result;
- `step_nodes` covers every chunk (the mean over all test inputs, as unchunked);
- adaptive bisection decides per test input, so the result does not depend on the chunking,
  and kink pieces count against `max_nodes`;
- the model check maps the trace's mismatch error by class and hides no other error.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import explaind_trace
from explaind_kernel import (
    InputError,
    KeepOptions,
    KernelConfig,
    KernelResult,
    ModelMismatchError,
    compare_quadrature,
    compute_kernel,
    jacobian,
)
from explaind_kernel.distributed import compute_kernel_sharded, split_segments
from explaind_trace.errors import TraceCorruptError, TraceMismatchError

from .models import SETUPS, KernelSetup, train
from .test_sharded import make_model

ROOT = Path(__file__).resolve().parents[2]
EXACT = 1e-10  # float64 on both sides, same arithmetic up to summation order
KEEP_ALL = KeepOptions(
    sample_component=True, sample_window=True, component_window=True, param_scores=True
)
FIELDS = (
    "f0",
    "fT",
    "data",
    "components",
    "component_data",
    "component_window",
    "sample_component",
    "sample_window",
    "step_data",
    "step_weight_decay",
    "step_nondata",
    "step_initial_state",
    "step_residual",
    "step_quadrature_error",
    "step_buffer_drift",
)


def _same(a: KernelResult, b: KernelResult, fields=FIELDS) -> None:
    """Every field equal to rounding on the output scale (sample order may differ)."""
    scale = max(float(np.max(np.abs(b.fT))), 1e-300)
    order = [b.sample_ids.index(s) for s in a.sample_ids]
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        if x is None and y is None:
            continue
        if name in ("data", "sample_component", "sample_window"):
            y = y[:, :, order]
        assert np.max(np.abs(x - y), initial=0.0) <= EXACT * scale, name


def _sgd_trace(store: str, *, steps: int = 6, every: int = 3) -> torch.Tensor:
    """An MLP under SGD with momentum in float64; returns the test inputs."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    with explaind_trace.record(model, opt, store=store, checkpoint_every=every):
        for t in range(steps):
            opt.zero_grad()
            idx = torch.arange(4 * t, 4 * t + 6) % 24
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return torch.randn(3, 4, dtype=torch.float64)


@pytest.fixture()
def one_rank_group(tmp_path: Path):
    """A one-process gloo group, so the sharded path runs in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------- options with config=
def test_options_next_to_config_are_refused_everywhere(one_rank_group) -> None:
    test_x = _sgd_trace("memory://smells-config")
    cfg = KernelConfig(dtype="float64", progress=False)
    msg = r"pass either config= or keyword options, not both; got config= and \['quadrature'\]"
    with pytest.raises(InputError, match="compute_kernel: " + msg):
        compute_kernel(
            "memory://smells-config", make_model(), test_x, config=cfg, quadrature="gauss:3"
        )
    with pytest.raises(InputError, match="compute_kernel_sharded: " + msg):
        compute_kernel_sharded(
            "memory://smells-config", make_model(), test_x, config=cfg, quadrature="gauss:3"
        )
    with pytest.raises(InputError, match="compare_quadrature: " + msg):
        compare_quadrature(
            "memory://smells-config", make_model(), test_x, ["gauss:1"], config=cfg,
            quadrature="gauss:3",
        )  # fmt: skip
    with pytest.raises(InputError, match=r"unknown option\(s\) \['quadratur'\]"):
        compute_kernel("memory://smells-config", make_model(), test_x, quadratur="gauss:3")
    # the config alone is honoured by both paths, and they agree
    single = compute_kernel("memory://smells-config", make_model(), test_x, config=cfg)
    sharded = compute_kernel_sharded("memory://smells-config", make_model(), test_x, config=cfg)
    assert sharded.config == single.config and sharded.config["dtype"] == "float64"
    _same(sharded, single)


# -------------------------------------------------------------------- runtime settings
def test_sharded_path_applies_threads_and_tf32_like_the_single_path(
    one_rank_group, monkeypatch
) -> None:
    test_x = _sgd_trace("memory://smells-tf32")
    seen: list[tuple[bool, bool, int]] = []
    values = jacobian.TestSide.values

    def spy(self, params, buffers):
        seen.append(
            (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.get_num_threads(),
            )
        )
        return values(self, params, buffers)

    monkeypatch.setattr(jacobian.TestSide, "values", spy)
    before = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_num_threads(),
    )
    threads = 2 if before[2] != 2 else 3
    kw = dict(dtype="float64", progress=False, device="cpu", allow_tf32=True, cpu_threads=threads)
    for run in (compute_kernel, compute_kernel_sharded):
        seen.clear()
        run("memory://smells-tf32", make_model(), test_x, **kw)
        assert seen and set(seen) == {(True, True, threads)}, run.__name__
        after = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_num_threads(),
        )
        assert after == before, f"{run.__name__} did not restore the settings"


# --------------------------------------------------------- sharded with an empty rank
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sharded(tmp_path: Path, trace: Path, test_x: torch.Tensor, name: str) -> KernelResult:
    np.save(tmp_path / f"{name}.npy", test_x.numpy())
    out = tmp_path / f"{name}.explaind"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), "-m", "tests.kernel.sharded_worker",
        str(trace), str(tmp_path / f"{name}.npy"), str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return KernelResult.load(out)


@pytest.mark.parametrize("every", [100, 2], ids=["rank1-has-no-segment", "both-ranks-hold-steps"])
def test_sharded_keep_all_equals_single_process(tmp_path: Path, every: int) -> None:
    trace = tmp_path / "run.lmdb"
    test_x = _sgd_trace(str(trace), steps=6, every=every)
    with explaind_trace.open_trace(str(trace)) as reader:
        parts = split_segments(list(reader.segments()), 2)
    assert (not parts[1]) == (every == 100)
    single = compute_kernel(
        str(trace), make_model(), test_x, dtype="float64", keep=KEEP_ALL, progress=False
    )
    sharded = _sharded(tmp_path, trace, test_x, "x")
    assert sharded.extra["world_size"] == 2
    _same(sharded, single)
    scale = max(float(np.max(v)) for v in single.param_scores.values())
    for n, v in single.param_scores.items():
        assert sharded.param_scores[n].shape == v.shape
        assert np.max(np.abs(sharded.param_scores[n] - v)) <= EXACT * scale, n
    np.testing.assert_array_equal(sharded.step_nodes, single.step_nodes)


# ----------------------------------------------------------------- chunk independence
@pytest.fixture(scope="module")
def relu_run():
    """The dropout Transformer (ReLU MLP: kinks on every step), 5 steps, 3 test inputs."""
    setup = KernelSetup(
        "relu", SETUPS[2].make_model, SETUPS[2].make_data, SETUPS[2].make_opt, steps=5
    )
    fresh, test_x, _ = train(setup, "memory://smells-relu")
    return "memory://smells-relu", fresh, test_x


def _k(run, **kw) -> KernelResult:
    store, fresh, test_x = run
    kw.setdefault("dtype", "float64")
    kw.setdefault("progress", False)
    x = kw.pop("x", test_x)
    return compute_kernel(store, fresh, x, **kw)


ONE_INPUT_PER_CHUNK = 1  # bytes: every chunk holds a single test input


def test_step_nodes_cover_every_chunk(relu_run) -> None:
    test_x = relu_run[2]
    whole = _k(relu_run, kink_splits=8)
    chunked = _k(relu_run, kink_splits=8, memory_budget=ONE_INPUT_PER_CHUNK)
    per_input = [_k(relu_run, kink_splits=8, x=test_x[i : i + 1]).step_nodes for i in range(3)]
    # the inputs meet different numbers of kinks, so the first chunk alone is not the mean
    assert not all(np.array_equal(per_input[0], p) for p in per_input[1:])
    truth = np.mean(per_input, axis=0)
    np.testing.assert_allclose(chunked.step_nodes, truth, rtol=1e-15, atol=0)
    np.testing.assert_allclose(whole.step_nodes, truth, rtol=1e-15, atol=0)
    _same(chunked, whole)


def test_adaptive_result_does_not_depend_on_the_memory_budget(relu_run) -> None:
    plain = _k(relu_run, quadrature="gauss:2")
    tol = float(np.max(np.abs(plain.step_quadrature_error))) / 50
    kw = dict(quadrature="gauss:2", adaptive_tol=tol, max_nodes=64)
    whole = _k(relu_run, **kw)
    chunked = _k(relu_run, memory_budget=ONE_INPUT_PER_CHUNK, **kw)
    assert whole.step_nodes.max() > 2  # it refined
    np.testing.assert_array_equal(chunked.step_nodes, whole.step_nodes)
    _same(chunked, whole)
    # each input refines on its own: a chunk holding it alone gives its rows
    one = _k(relu_run, x=relu_run[2][1:2], **kw)
    scale = float(np.max(np.abs(whole.fT)))
    assert np.max(np.abs(one.step_quadrature_error[0] - whole.step_quadrature_error[1])) <= (
        EXACT * scale
    )
    assert np.max(np.abs(whole.step_quadrature_error)) <= tol


def _deep_relu() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    ).double()


@pytest.mark.parametrize("kink_splits,budget", [(2, 10), (3, 12)])
def test_adaptive_budget_counts_kink_pieces(kink_splits: int, budget: int) -> None:
    """Two ReLU layers and large steps: a step holds more kinks than `kink_splits`, so each
    half of a bisected piece finds its own — the split costs more than two plain pieces. The
    budget must hold with those kink pieces counted (before the fix: 12 and 16 evaluations)."""
    store = f"memory://smells-kink-budget-{kink_splits}"
    model = _deep_relu()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    with explaind_trace.record(model, opt, store=store):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    test_x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for i in range(3):
        one = compute_kernel(
            store,
            _deep_relu(),
            test_x[i : i + 1],
            dtype="float64",
            progress=False,
            quadrature="gauss:2",
            kink_splits=kink_splits,
            adaptive_tol=1e-14,  # unreachable: refinement stops at the budget
            max_nodes=budget,
        )
        # N = 1: step_nodes is this input's Jacobian evaluations per step, kink pieces included
        assert one.step_nodes.max() <= budget, (i, one.step_nodes)
        assert one.step_nodes.max() > 2 * (kink_splits + 1)  # it refined past one piece


# -------------------------------------------------------------------- the model check
class _Proxy:
    """An open reader whose `check_model` / `step` can be replaced."""

    def __init__(self, reader, **override) -> None:
        self._reader, self._override = reader, override

    def __getattr__(self, name):
        if name in self._override:
            return self._override[name]
        return getattr(self._reader, name)


def test_model_check_maps_mismatch_by_class_and_hides_nothing() -> None:
    test_x = _sgd_trace("memory://smells-check")

    class RenamedMismatch(TraceMismatchError):
        """A subclass under another name: matched by class, not by name."""

    def mismatch(model):
        raise RenamedMismatch("parameter 'net.0.weight' differs")

    def corrupt(t):
        raise TraceCorruptError("step record 0 is malformed")

    with explaind_trace.open_trace("memory://smells-check") as reader:
        with pytest.raises(ModelMismatchError, match=r"net\.0\.weight") as info:
            compute_kernel(_Proxy(reader, check_model=mismatch), make_model(), test_x)
        assert isinstance(info.value.__cause__, RenamedMismatch)
        # the check against the first recorded forward no longer swallows a damaged trace
        with pytest.raises(TraceCorruptError, match="malformed"):
            compute_kernel(_Proxy(reader, step=corrupt), make_model(), test_x, progress=False)
