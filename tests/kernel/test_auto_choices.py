"""Automatic choices (cpu_threads="auto", training_mode="auto") pick a configuration and give
bitwise what the explicit choice of that configuration gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind_kernel import KernelConfig, compute_kernel
from explaind_kernel.errors import InputError
from explaind_kernel.runtime import auto_cpu_threads, resolve_cpu_threads

from .models import SETUPS, KernelSetup, train

FIELDS = ("data", "components", "component_data", "step_data", "step_nondata", "nondata", "f0")


def test_auto_threads_is_one_or_all() -> None:
    most = torch.get_num_threads()
    assert auto_cpu_threads(64, 1000) in (1, most)
    assert resolve_cpu_threads(None, 64, 1000) is None
    assert resolve_cpu_threads(3, 64, 1000) == 3


def test_cpu_threads_is_validated() -> None:
    with pytest.raises(InputError, match="cpu_threads must be 'auto', None or an integer ≥ 1"):
        KernelConfig(cpu_threads=0)
    with pytest.raises(InputError, match="cpu_threads must be 'auto'"):
        KernelConfig(cpu_threads="many")
    assert KernelConfig().cpu_threads == "auto"


@pytest.mark.parametrize("setup", SETUPS[1:], ids=lambda s: s.name)
def test_auto_equals_the_explicit_choice_bitwise(setup) -> None:
    short = KernelSetup(setup.name, setup.make_model, setup.make_data, setup.make_opt, steps=5)
    store = f"memory://auto-{setup.name}"
    fresh, test_x, _ = train(short, store)
    auto = compute_kernel(store, fresh, test_x[:2], progress=False)
    threads, routes = auto.extra["cpu_threads"], auto.extra["training_routes"]
    assert threads in (1, torch.get_num_threads())
    assert len(routes) == 1 and sum(routes.values()) == 5  # one forward per step
    (route,) = routes
    explicit = compute_kernel(
        store, fresh, test_x[:2], progress=False, cpu_threads=threads, training_mode=route
    )
    assert explicit.extra["training_routes"] == routes
    for f in FIELDS:
        assert np.array_equal(getattr(auto, f), getattr(explicit, f)), f


def test_auto_threads_is_one_on_a_busy_machine(monkeypatch) -> None:
    import explaind_kernel.runtime as runtime

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(runtime, "_others_running", lambda: None)  # no /proc: the load average
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (3.5, 1.0, 1.0))

    def no_timing(*a, **k):  # a busy machine is not measured
        raise AssertionError("calibrated on a busy machine")

    monkeypatch.setattr(runtime, "_time_ops", no_timing)
    assert auto_cpu_threads(64, 1000) == 1
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.5, 1.0, 1.0))
    monkeypatch.setattr(runtime, "_time_ops", lambda threads, *a: 1.0 / threads)
    runtime._CHOSEN.clear()
    assert auto_cpu_threads(64, 1000) == 4  # quiet: measured, and all threads are faster here
    runtime._CHOSEN.clear()


def test_the_bench_cap_stops_a_hopeless_run() -> None:
    """bench_auto_choices reports a run over its cap as "over cap" instead of waiting for it."""
    import signal
    import time

    from bench.bench_auto_choices import OVER_CAP, capped

    def spin() -> None:
        while True:
            time.sleep(0.01)

    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    assert capped(0.2, spin) == OVER_CAP
    assert time.perf_counter() - t0 < 5
    assert capped(5.0, lambda x: x + 1, 2) == 3
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_probe_past_the_fastest_route_stops_after_its_first_block() -> None:
    """training_mode="auto" probes a route's first two blocks, but stops after the first once
    it alone took longer than the fastest route timed so far (that route cannot win: its time
    only grows); without a limit, or within it, both blocks run and the time is extrapolated."""
    import time

    from explaind_kernel.train_blocks import (
        competitive,
        limited_probe,
        mark_block,
        probe_seconds,
    )

    t0 = time.perf_counter() - 5.0  # the first block took 5 s
    late = limited_probe(t0, {"rules": 1.0})
    assert mark_block(late, 1, 10) and late["stopped"] == 1.0
    assert probe_seconds(late, t0) > 1.0  # so it loses to the 1 s route
    ok = limited_probe(t0, {"rules": 60.0})
    assert not mark_block(ok, 1, 10) and "stopped" not in ok
    assert mark_block(ok, 2, 10)
    assert limited_probe(t0, {}) == {} and not mark_block({}, 1, 10)
    assert competitive(1.2, {"rules": 1.0}) and not competitive(1.3, {"rules": 1.0})
    assert competitive(100.0, {})


def test_busy_means_other_processes_running_now_not_this_ones_past(monkeypatch) -> None:
    """With /proc/loadavg, busy is decided by the other processes' runnable threads now (one
    of torch's threads would share a core), not by a load average that still holds this
    process's own last minute; the count is read from the kernel's file."""
    import explaind_kernel.runtime as runtime

    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # ignored
    monkeypatch.setattr(runtime, "_others_running", lambda: 0)
    assert runtime._busy(2) is None and runtime._busy(4) is None
    monkeypatch.setattr(runtime, "_others_running", lambda: 1)
    assert runtime._busy(2) == "1 other runnable thread(s)" and runtime._busy(4) is None
    monkeypatch.setattr(runtime, "_others_running", lambda: 3)
    assert runtime._busy(4) == "3 other runnable thread(s)"


def test_other_runnable_threads_are_counted() -> None:
    """A process spinning next to this one is counted (where the platform has /proc)."""
    import subprocess
    import sys

    from explaind_kernel.runtime import _others_running

    if _others_running() is None:
        pytest.skip("no /proc/loadavg on this platform")
    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<5: pass"]
    )
    try:
        import time

        time.sleep(0.3)  # the child is past its start-up and spinning
        assert _others_running() >= 1
    finally:
        spin.kill()
        spin.wait()


def _calibrations(monkeypatch) -> list:
    """The TrainingSide objects whose auto calibration ran, and the routes each probed."""
    from explaind_kernel import training_side as ts

    seen: list = []
    real_cal, real_fad, real_bat = (
        ts.TrainingSide._calibrate,
        ts.TrainingSide._forward_ad,
        ts.TrainingSide._batched,
    )

    def calibrate(self, *a, **k):
        self.probed = []
        seen.append(self)
        return real_cal(self, *a, **k)

    def forward_ad(self, *a, **k):
        getattr(self, "probed", []).append("forward_ad")
        return real_fad(self, *a, **k)

    def batched(self, *a, **k):
        getattr(self, "probed", []).append(k.get("mode"))
        return real_bat(self, *a, **k)

    monkeypatch.setattr(ts.TrainingSide, "_calibrate", calibrate)
    monkeypatch.setattr(ts.TrainingSide, "_forward_ad", forward_ad)
    monkeypatch.setattr(ts.TrainingSide, "_batched", batched)
    return seen


@pytest.mark.parametrize("margin", [0.01, 100.0])
def test_auto_measures_only_routes_that_can_beat_the_rules(margin, monkeypatch) -> None:
    """Where the rules hold, auto never probes the per-sample route (B backwards of the batch
    for what the rules get from one), and probes forward_ad only when its arithmetic bound is
    within TANGENT_MARGIN of the rules'; the run equals the explicit rules route bitwise."""
    from explaind_kernel import training_side as ts

    setup = KernelSetup("mlp", SETUPS[0].make_model, SETUPS[0].make_data, SETUPS[0].make_opt, 3)
    store = f"memory://auto-bound-{margin}"
    fresh, test_x, _ = train(setup, store)
    monkeypatch.setattr(ts, "TANGENT_MARGIN", margin)
    seen = _calibrations(monkeypatch)
    auto = compute_kernel(store, fresh, test_x[:2], progress=False, cpu_threads=1)
    (side,) = seen
    assert "per_sample" not in side.probed and "per_sample" not in side.timings
    assert ("forward_ad" in side.probed) == (margin > 1.0), side.probed
    assert auto.extra["training_routes"] == {"rules": 3}
    explicit = compute_kernel(
        store, fresh, test_x[:2], progress=False, cpu_threads=1, training_mode="rules"
    )
    for f in FIELDS:
        assert np.array_equal(getattr(auto, f), getattr(explicit, f)), f


def test_the_tangent_bound_is_rows_of_batch_forwards_over_the_rules_work(monkeypatch) -> None:
    """_tangent_bound = R·F / (4·F + 2·B·P·R), F the recorded batch's forward FLOPs counted
    here independently on a fresh model of the architecture."""
    from torch.utils.flop_counter import FlopCounterMode

    from explaind_kernel import training_side as ts

    setup = KernelSetup("mlp", SETUPS[0].make_model, SETUPS[0].make_data, SETUPS[0].make_opt, 2)
    store = "memory://auto-bound-formula"
    fresh, test_x, _ = train(setup, store)
    got: list = []
    real = ts.TrainingSide._tangent_bound

    def spy(self, params, buffers, forward, z_grad):
        got.append((real(self, params, buffers, forward, z_grad), forward, z_grad))
        return got[-1][0]

    monkeypatch.setattr(ts.TrainingSide, "_tangent_bound", spy)
    compute_kernel(store, fresh, test_x[:2], progress=False, cpu_threads=1)
    bound, forward, z_grad = got[0]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        setup.make_model()(forward.args[0].float())
    f = float(counter.get_total_flops())
    rows = 2 * 3  # two inputs × three outputs
    params = sum(p.numel() for p in fresh.parameters())
    assert f > 0 and next(iter(z_grad.values())).shape[0] == rows
    expect = rows * f / (4 * f + 2 * len(forward.ids) * params * rows)
    assert bound == pytest.approx(expect, rel=1e-12)


def test_the_rules_are_timed_without_their_per_sample_check(monkeypatch) -> None:
    """The first forward's per-sample check (one forward in check_every) is not charged to the
    rules route's measured time."""
    import time

    from explaind_kernel import training_side as ts

    setup = KernelSetup("mlp", SETUPS[0].make_model, SETUPS[0].make_data, SETUPS[0].make_opt, 2)
    store = "memory://auto-check-time"
    fresh, test_x, _ = train(setup, store)
    real = ts.rows_check

    def slow_check(*a, **k):
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(ts, "rows_check", slow_check)
    seen = _calibrations(monkeypatch)
    compute_kernel(store, fresh, test_x[:2], progress=False, cpu_threads=1)
    (side,) = seen
    assert 0.0 < side.timings["rules"] < 0.5
