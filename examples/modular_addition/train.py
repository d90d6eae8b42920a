"""Train a one-layer Transformer on (a + b) mod p while recording the run for ExPLAIND.

    python examples/modular_addition/train.py --out runs/modadd            # minutes on 2 CPU cores
    python examples/modular_addition/train.py --out runs/modadd113 --paper  # p=113, the paper's set-up

The training loop is plain PyTorch; one ``with explaind_trace.record(...)`` line records it.
Each training pair gets the sample id ``"a+b"``. Training/test accuracy is measured every
``--eval-every`` steps under ``torch.no_grad()`` (not recorded) and written to history.csv;
the configuration goes to config.json so analyze.py can rebuild the model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import explaind_trace
from explaind_attr.app.demo.model import ModularAdditionTransformer, make_dataset

SMALL = {
    "p": 23,
    "d_model": 64,
    "n_heads": 4,
    "d_mlp": 256,
    "train_fraction": 0.5,
    "lr": 1e-2,
    "batch_size": 64,
    "steps": 1000,
}
PAPER = {
    "p": 113,
    "d_model": 128,
    "n_heads": 4,
    "d_mlp": 512,
    "train_fraction": 0.3,
    "lr": 1e-3,
    "batch_size": 0,
    "steps": 10000,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default="runs/modular_addition", help="run directory (trace, history, config)"
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="paper scale: p=113, d_model 128, d_mlp 512, lr 1e-3, train fraction 0.3, full batch",
    )
    for name, kind in (
        ("p", int),
        ("d_model", int),
        ("n_heads", int),
        ("d_mlp", int),
        ("train_fraction", float),
        ("lr", float),
        ("batch_size", int),
        ("steps", int),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"default {SMALL[name]} ({PAPER[name]} with --paper)"
            + ("; 0 = full batch" if name == "batch_size" else ""),
        )
    p.add_argument("--weight-decay", type=float, default=1.0)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    p.add_argument("--warmup", type=int, default=10, help="steps of linear learning-rate warm-up")
    p.add_argument("--eval-every", type=int, default=10, help="steps between accuracy measurements")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: tiny models run fastest on one)",
    )
    p.add_argument(
        "--no-record",
        action="store_true",
        help="train without recording (to measure the recording overhead)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    base = PAPER if args.paper else SMALL
    for name, default in base.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on the whole set, without recording anything."""
    with torch.no_grad():
        logits = model(x)
        return float(torch.nn.functional.cross_entropy(logits, y)), float(
            (logits.argmax(-1) == y).float().mean()
        )


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

    train_x, train_y, test_x, test_y = make_dataset(args.p, args.train_fraction, args.seed)
    torch.manual_seed(args.seed)
    model = ModularAdditionTransformer(args.p, args.d_model, args.n_heads, args.d_mlp)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas)
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / max(1, args.warmup))
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(args.seed)
    batch = args.batch_size if 0 < args.batch_size < len(train_x) else len(train_x)
    ids = [f"{a}+{b}" for a, b in train_x[:, :2].tolist()]

    history = [(0, *evaluate(model, train_x, train_y), *evaluate(model, test_x, test_y))]
    eval_s = 0.0
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
        for step in range(1, args.steps + 1):
            idx = torch.randperm(len(train_x), generator=order)[:batch]
            if rec is not None:
                rec.set_sample_ids([ids[i] for i in idx.tolist()])
            opt.zero_grad()
            loss_fn(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
            warmup.step()  # per-step learning rates are part of the trace
            if step % args.eval_every == 0 or step == args.steps:
                t0 = time.perf_counter()
                history.append(
                    (step, *evaluate(model, train_x, train_y), *evaluate(model, test_x, test_y))
                )
                eval_s += time.perf_counter() - t0
    train_s = time.perf_counter() - start - eval_s

    with open(
        out / ("history.csv" if not args.no_record else "history_norecord.csv"), "w", newline=""
    ) as fh:
        w = csv.writer(fh)
        w.writerow(["step", "train_loss", "train_accuracy", "test_loss", "test_accuracy"])
        w.writerows(history)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "no_progress")}
    config["betas"] = list(args.betas)
    config.update(n_train=len(train_x), n_test=len(test_x), batch=batch)
    (out / "config.json").write_text(json.dumps(config, indent=2))

    summary = {
        "steps": args.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "n_train": len(train_x),
        "batch": batch,
        "recorded": not args.no_record,
        "train_seconds": train_s,
        "seconds_per_step": train_s / args.steps,
        "trace_bytes": _size(trace) if not args.no_record else 0,
        "final_train_accuracy": history[-1][2],
        "final_test_accuracy": history[-1][4],
    }
    (out / ("train.json" if not args.no_record else "train_norecord.json")).write_text(
        json.dumps(summary, indent=2)
    )
    print(
        f"{args.steps} steps in {train_s:.1f} s ({1000 * train_s / args.steps:.1f} ms/step); "
        f"train acc {history[-1][2]:.3f}, test acc {history[-1][4]:.3f}"
    )
    if not args.no_record:
        print(f"trace: {trace} ({summary['trace_bytes'] / 2**20:.1f} MiB)")
    return summary


def _size(trace: Path) -> int:
    """Bytes the trace occupies on disk, as its store reports them."""
    with explaind_trace.open_trace(str(trace)) as reader:
        return int(reader.store.nbytes() or 0)


if __name__ == "__main__":
    main()
