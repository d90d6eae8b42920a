"""Train a small CNN (batch norm) on two CIFAR-10 classes while recording the run.

    python examples/cifar2/train.py --synthetic --out runs/cifar2          # no download needed
    python examples/cifar2/train.py --root data/cifar10 --out runs/cifar2  # cat vs dog from disk

SGD with momentum and weight decay on minibatches; each image's sample id is its index in
the (filtered) dataset, given with ``rec.set_sample_ids``. The configuration goes to
config.json for analyze.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import explaind_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_data import CLASSES, load  # noqa: E402
from model import SmallCNN  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/cifar2", help="run directory")
    p.add_argument("--synthetic", action="store_true", help="synthetic CIFAR-2-like images")
    p.add_argument("--root", default="data/cifar10", help="CIFAR-10 root (never downloaded)")
    p.add_argument(
        "--classes",
        type=int,
        nargs=2,
        default=(3, 5),
        help="two CIFAR-10 labels (default cat, dog)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training images (default 1000 synthetic, all real)",
    )
    p.add_argument(
        "--n-test", type=int, default=None, help="test images (default 400 synthetic, all real)"
    )
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layer")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--no-record", action="store_true", help="train without recording (overhead baseline)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.synthetic:
        args.n_train = args.n_train or 1000
        args.n_test = args.n_test or 400
    return args


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    model.train(was)
    return acc


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    trace = out / "trace.lmdb"
    if trace.exists() and not args.no_record:
        if not args.overwrite:
            raise SystemExit(f"{trace} exists; pass --overwrite or choose another --out")
        shutil.rmtree(trace)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "no_progress")}
    config["classes"] = list(args.classes)
    train, test = load(config, train=True), load(config, train=False)

    torch.manual_seed(args.seed)
    model = SmallCNN(num_classes=2, width=args.width)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(args.seed)
    n = len(train.y)

    recording = (
        contextlib.nullcontext()
        if args.no_record
        else explaind_trace.record(
            model,
            opt,
            store=str(trace),
            checkpoint_every=args.checkpoint_every,
            progress=not args.no_progress,
        )
    )
    start = time.perf_counter()
    with recording as rec:  # the only ExPLAIND line of the training loop
        for _ in range(args.steps):
            idx = torch.randint(0, n, (args.batch_size,), generator=order)
            if rec is not None:
                rec.set_sample_ids(train.index[idx].tolist())
            opt.zero_grad()
            loss_fn(model(train.x[idx]), train.y[idx]).backward()
            opt.step()
    train_s = time.perf_counter() - start

    config.update(n_train=n, n_test=len(test.y))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    summary = {
        "steps": args.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "recorded": not args.no_record,
        "train_seconds": train_s,
        "seconds_per_step": train_s / args.steps,
        "trace_bytes": _size(trace) if not args.no_record else 0,
        "train_accuracy": accuracy(model, train.x, train.y),
        "test_accuracy": accuracy(model, test.x, test.y),
        "classes": [CLASSES[c] for c in args.classes]
        if not args.synthetic
        else ["synthetic 0", "synthetic 1"],
    }
    (out / ("train.json" if not args.no_record else "train_norecord.json")).write_text(
        json.dumps(summary, indent=2)
    )
    print(
        f"{args.steps} steps in {train_s:.1f} s ({1000 * train_s / args.steps:.1f} ms/step); "
        f"train acc {summary['train_accuracy']:.3f}, test acc {summary['test_accuracy']:.3f}"
    )
    if not args.no_record:
        print(f"trace: {trace} ({summary['trace_bytes'] / 2**20:.1f} MiB)")
    return summary


def _size(trace: Path) -> int:
    with explaind_trace.open_trace(str(trace)) as reader:
        return int(reader.store.nbytes() or 0)


if __name__ == "__main__":
    main()
