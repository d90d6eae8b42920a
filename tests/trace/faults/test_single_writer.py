"""One writer per trace across processes: two recorders started at the same instant."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

STEPS = 6


def _recorder(path: str, barrier, results) -> None:  # runs in a spawned process
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    import explaind_trace as et
    from tests.trace import trace_helpers as th

    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    barrier.wait()
    try:
        with et.record(model, opt, store=path):
            for _ in range(STEPS):
                th.train(model, opt, None, x, y, steps=1)
                time.sleep(0.02)  # the other process reads while this one writes
    except et.TraceExistsError as e:
        # the loser: other processes read the trace while it is being written
        for _ in range(200):
            try:
                with et.open_trace(path) as trace:
                    trace.step(0) if trace.num_steps else None
                    results.put(("refused", str(e), trace.num_steps))
                    return
            except et.NotATraceError:
                time.sleep(0.01)
        results.put(("refused", str(e), -1))
        return
    except Exception as e:
        results.put(("raised", f"{type(e).__name__}: {e}", 0))
        return
    results.put(("recorded", "", STEPS))


@pytest.mark.parametrize("scheme", ["lmdb", "dir"])
def test_two_recorders_started_at_once_exactly_one_records(tmp_path, scheme) -> None:
    import explaind_trace as et

    ctx = mp.get_context("spawn")
    path = f"{scheme}://{tmp_path / 'race'}"
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_recorder, args=(path, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"a recorder process ended with {p.exitcode}"
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    kinds = [o[0] for o in outcomes]
    assert kinds == ["recorded", "refused"], outcomes
    assert "another writer is recording" in outcomes[1][1] or "already exists" in outcomes[1][1]
    assert outcomes[1][2] >= 0, "the loser could not read the trace while it was written"
    with et.open_trace(path) as trace:  # the winner's trace, untouched by the loser
        assert trace.num_steps == STEPS and trace.finished
        assert len(trace.step(0).forwards) == 1
        assert trace.check_drift().exact
