"""Fault probes, run in a child process by ``harness.run_probe`` (``python -m`` this module).

Each probe prints one JSON line per case. Memory is bounded with ``resource.setrlimit``
after the imports, so a decoder that believes a hostile size fails here instead of taking
the machine.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import explaind_trace as et
from explaind_trace.errors import ExplaindError
from explaind_trace.info import describe, verify_trace
from explaind_trace.stores.lmdb_store import check_lmdb_file
from tests.trace import trace_helpers as th

from .harness import MEMORY_BUDGET

PROBES: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {}


def probe(fn: Callable[..., Iterator[dict[str, Any]]]) -> Callable[..., Iterator[dict[str, Any]]]:
    PROBES[fn.__name__] = fn
    return fn


def make_trace(spec: str, *, steps: int = 7, width: int = 16) -> None:
    """A small trace holding every record kind: meta, progress, steps, checkpoints (every
    3 steps), samples, a skipped iteration and the final state."""
    torch.manual_seed(0)
    model = th.MLP(d_hidden=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = th.data()
    with et.record(model, opt, store=spec, checkpoint_every=3):
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.zero_grad()  # discarded gradients: a skip record
        th.train(model, opt, None, x, y, steps=steps)


def read_all(spec: str) -> dict[str, Any]:
    """Read everything back: every record (verify), then info with a full replay."""
    try:
        report = verify_trace(spec)
        if report.ok:
            describe(spec, check_drift=True)
    except ExplaindError as e:
        return {"outcome": "error", "cls": type(e).__name__, "msg": str(e)}
    return {
        "outcome": "ok",
        "damaged": report.damaged,
        "intact": report.intact_steps,
        "steps": report.steps,
    }


def guarded(case: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s outcome; an escaping non-ExPLAIND exception becomes outcome ``raw``."""
    try:
        out = fn()
    except ExplaindError as e:
        out = {"outcome": "error", "cls": type(e).__name__, "msg": str(e)}
    except Exception as e:  # what the suite exists to catch
        out = {"outcome": "raw", "cls": type(e).__name__, "msg": traceback.format_exc()[-800:]}
    return {"case": case, **out}


@probe
def lmdb_truncation(tmp: str) -> Iterator[dict[str, Any]]:
    """data.mdb cut at every page boundary (and one byte short of each), lock.mdb gone too."""
    src = Path(tmp) / "src.lmdb"
    make_trace(str(src))
    psize = check_lmdb_file(src)
    size = (src / "data.mdb").stat().st_size
    yield {"case": "sizes", "outcome": "ok", "psize": psize, "size": size}
    cuts = sorted({k * psize for k in range(size // psize + 1)} | {size - 1, 1, 100})
    for n in cuts:
        for keep_lock in (True, False):
            dst = Path(tmp) / f"cut-{n}-{keep_lock}.lmdb"
            shutil.copytree(src, dst)
            os.truncate(dst / "data.mdb", n)
            if not keep_lock:
                (dst / "lock.mdb").unlink()
            yield guarded([n, keep_lock], lambda d=dst: read_all(str(d)))
            shutil.rmtree(dst)


@probe
def dir_truncation(tmp: str, per_record: int = 3, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Every record file of a directory store cut at random offsets, one at a time."""
    src = Path(tmp) / "src"
    make_trace(f"dir://{src}")
    rng = random.Random(seed)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        rel = f.relative_to(src)
        n = f.stat().st_size
        for cut in sorted({0, n - 1, *(rng.randrange(n) for _ in range(per_record))}):
            dst = Path(tmp) / "cut"
            shutil.copytree(src, dst)
            os.truncate(dst / rel, cut)
            yield guarded([str(rel), cut, n], lambda d=dst: read_all(f"dir://{d}"))
            shutil.rmtree(dst)


@probe
def full_disk(mount: str) -> Iterator[dict[str, Any]]:
    """Record into a small filesystem until it is full; read back; record into it full."""
    for scheme in ("lmdb", "dir"):
        spec = f"{scheme}://{mount}/{scheme}-a"

        def record_until_full(spec: str = spec) -> dict[str, Any]:
            torch.manual_seed(0)
            model = th.MLP(d_in=64, d_hidden=256)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = th.data(d_in=64)
            steps = 0
            try:
                with et.record(model, opt, store=spec, checkpoint_every=5) as rec:
                    for steps in range(10_000):  # noqa: B007 - the count is reported
                        th.train(model, opt, None, x, y, steps=1)
                        rec.flush()
            except et.TraceWriteError as e:
                return {"outcome": "error", "cls": type(e).__name__, "msg": str(e), "at": steps}
            return {"outcome": "ok", "at": steps}

        yield guarded([scheme, "record"], record_until_full)
        yield guarded([scheme, "read"], lambda spec=spec: read_all(spec))
        yield guarded([scheme, "info"], lambda spec=spec: {"outcome": "ok", **_info(spec)})
        if scheme == "lmdb":
            lock = Path(mount) / "lmdb-a" / "lock.mdb"
            lock.unlink()
            yield guarded([scheme, "read-no-lock"], lambda spec=spec: read_all(spec))
        yield guarded([scheme, "record-full"], lambda s=scheme: _record_once(f"{s}://{mount}/b"))
        for entry in Path(mount).iterdir():  # room again for the next backend
            shutil.rmtree(entry)


@probe
def special_files(tmp: str) -> Iterator[dict[str, Any]]:
    """A FIFO, a device and a directory in place of a directory store's records."""
    src = Path(tmp) / "src"
    make_trace(f"dir://{src}")
    for key in ("step/00000002", "sample", "ckpt/00000003", "progress", "meta"):
        for kind in ("fifo", "device", "dir"):
            dst = Path(tmp) / "special"
            shutil.copytree(src, dst)
            target = dst / key
            if target.is_dir():
                target = next(p for p in sorted(target.iterdir()))
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            if kind == "fifo":
                os.mkfifo(target)
            elif kind == "device":
                os.symlink("/dev/zero", target)
            else:
                target.mkdir()
            rel = str(target.relative_to(dst))
            yield guarded([rel, kind], lambda d=dst: read_all(f"dir://{d}"))
            shutil.rmtree(dst)


def _info(spec: str) -> dict[str, Any]:
    d = describe(spec, check_drift=False)
    return {"error": d["error"], "steps": d["steps"]}


def _record_once(spec: str) -> dict[str, Any]:
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    with et.record(model, opt, store=spec):
        th.train(model, opt, None, x, y, steps=2)
    return {"outcome": "ok"}


def _limit_memory(budget: int) -> None:
    with open("/proc/self/statm") as fh:
        vsize = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vsize + budget, vsize + budget))


def main() -> None:
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    _limit_memory(MEMORY_BUDGET)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs.setdefault("tmp", tmp) if "tmp" in PROBES[name].__code__.co_varnames else None
        for line in PROBES[name](**kwargs):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
