"""One writer per trace across processes: two recorders started at the same instant."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

STEPS = 6
SCHEMES = ("lmdb", "dir")


def _race(path: str, barrier) -> tuple[str, str, int]:
    import torch

    import explaind_trace as et
    from tests.trace import trace_helpers as th

    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    barrier.wait()  # both processes call record() at the same instant
    try:
        with et.record(model, opt, store=path):
            for _ in range(STEPS):
                th.train(model, opt, None, x, y, steps=1)
                time.sleep(0.02)  # the other process reads while this one writes
    except et.TraceExistsError as e:
        # the loser: other processes read the trace while it is being written
        # until the winner's header is committed (its writer thread may be slow to get a
        # core on a loaded machine: a fixed 2 s of retries failed once under load 5 on 2 cores)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with et.open_trace(path) as trace:
                    trace.step(0) if trace.num_steps else None
                    return ("refused", str(e), trace.num_steps)
            except et.NotATraceError:
                time.sleep(0.01)
        return ("refused", str(e), -1)
    except Exception as e:
        return ("raised", f"{type(e).__name__}: {e}", 0)
    return ("recorded", "", STEPS)


def _recorder(paths: list[str], barrier, results) -> None:  # runs in a spawned process
    os.environ["OMP_NUM_THREADS"] = "1"
    for path in paths:
        results.put((path, _race(path, barrier)))


def test_two_recorders_started_at_once_exactly_one_records(tmp_path) -> None:
    import explaind_trace as et

    ctx = mp.get_context("spawn")
    paths = [f"{scheme}://{tmp_path / scheme}" for scheme in SCHEMES]
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_recorder, args=(paths, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0, f"a recorder process ended with {p.exitcode}"
    outcomes: dict[str, list] = {p: [] for p in paths}
    for _ in range(2 * len(paths)):
        path, outcome = results.get(timeout=5)
        outcomes[path].append(outcome)
    for path in paths:
        got = sorted(outcomes[path])
        assert [o[0] for o in got] == ["recorded", "refused"], (path, got)
        assert "another writer is recording" in got[1][1] or "already exists" in got[1][1]
        assert got[1][2] >= 0, f"the loser could not read {path} while it was written"
        with et.open_trace(path) as trace:  # the winner's trace, untouched by the loser
            assert trace.num_steps == STEPS and trace.finished
            assert len(trace.step(0).forwards) == 1
            assert trace.check_drift().exact
