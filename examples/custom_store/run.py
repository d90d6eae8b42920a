"""Record → kernel → completeness through a storage backend defined in this folder.

    python examples/custom_store/run.py --out runs/custom_store

Trains a small MLP classifier (SGD with Nesterov momentum, minibatches) while recording into
``sqlite://OUT/trace.sqlite`` (see sqlite_store.py), reads the trace back through the same
backend, computes the path kernel on held-out points, prints the completeness line and
writes the report (OUT/report/report.html).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import explaind_attr
import explaind_kernel
import explaind_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sqlite_store import SQLiteStore  # noqa: E402  (registers the "sqlite" scheme)


def make_model(n_features: int = 8, n_classes: int = 3, hidden: int = 32) -> nn.Module:
    """The classifier this example trains (rebuilt from scratch for the kernel)."""
    return nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))


def make_data(
    n: int, seed: int, n_features: int = 8, n_classes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: n points, labels 0..n_classes-1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, n_features, generator=g) * 2.0
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, n_features, generator=g)
    return x, y


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/custom_store", help="output directory")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-test", type=int, default=16, help="held-out points to explain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = f"sqlite://{out / 'trace.sqlite'}"
    if (out / "trace.sqlite").exists():
        if not args.overwrite:
            raise SystemExit(
                f"{out / 'trace.sqlite'} exists; pass --overwrite or choose another --out"
            )
        (out / "trace.sqlite").unlink()
    print(f"store schemes installed: {', '.join(explaind_trace.available_schemes())}")

    torch.manual_seed(args.seed)
    x, y = make_data(args.n_train + args.n_test, args.seed)
    train_x, train_y, test_x = x[: args.n_train], y[: args.n_train], x[args.n_train :]
    model = make_model()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    with explaind_trace.record(model, opt, store=trace, checkpoint_every=20):
        for _ in range(args.steps):
            idx = torch.randint(0, args.n_train, (args.batch_size,), generator=order)
            opt.zero_grad()
            loss_fn(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
    record_s = time.perf_counter() - start

    with explaind_trace.open_trace(trace) as reader:  # read back through SQLiteStore
        assert isinstance(reader.store, SQLiteStore)
        steps, finished, nbytes = reader.num_steps, reader.finished, reader.store.nbytes()

    start = time.perf_counter()
    result = explaind_kernel.compute_kernel(
        trace, make_model(), test_x, outputs="predicted", progress=not args.no_progress
    )
    kernel_s = time.perf_counter() - start
    result.save(out / "result.explaind")
    report = explaind_attr.build_report(
        result, out / "report", title="ExPLAIND: MLP traced into SQLite"
    )

    samples = len(result.sample_ids)
    max_abs, rel = result.completeness()
    summary = {
        "trace": trace,
        "steps": steps,
        "finished": finished,
        "distinct_samples": samples,
        "trace_bytes": nbytes,
        "record_s": record_s,
        "kernel_s": kernel_s,
        "completeness_max_abs": max_abs,
        "completeness_rel": rel,
        "max_abs_fT": float(abs(result.fT).max()),
        "report": str(report.html),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"trace: {trace} ({steps} steps, {samples} distinct samples, {nbytes} bytes)")
    print(result.completeness_line())
    print(f"report: {report.html}")
    return summary


if __name__ == "__main__":
    main()
