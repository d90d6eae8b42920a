"""Explain a recorded CIFAR-2 run, and prune with the kernel's parameter-wise scores.

    python examples/cifar2/analyze.py --run runs/cifar2

1. the path kernel of the correct-class logit of held-out images, keeping the
   parameter-wise scores (Σ over explained rows of |Σ_t J̄_t ⊙ Δθ_t| per weight);
2. the HTML report, with the most influential training images read back from the trace;
3. the pruning study: zero the lowest-ranked weights of the conv and linear layers at
   increasing sparsity and measure held-out accuracy, ranking by the kernel's scores, by
   magnitude |θ| and by first-order Taylor |θ ⊙ ∂L/∂θ| (explaind_attr.prune_curves);
   curves in pruning.json / pruning.csv and pruning.png. The explained images are not used
   to measure accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import explaind_attr
import explaind_kernel
import explaind_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_data import load  # noqa: E402
from model import SmallCNN  # noqa: E402

SPARSITIES = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/cifar2", help="run directory of train.py")
    p.add_argument("--out", default=None, help="analysis directory (default RUN/analysis)")
    p.add_argument("--n-explain", type=int, default=16, help="held-out images to explain")
    p.add_argument(
        "--taylor-batch", type=int, default=256, help="training images for the Taylor loss"
    )
    p.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    p.add_argument("--step-windows", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the saved result.explaind of this trace instead of recomputing it",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def plot(path: Path, curves, n_eval: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=90, layout="constrained")
    ax = fig.subplots()
    labels = {
        "scores": "ExPLAIND scores",
        "magnitude": "magnitude |θ|",
        "taylor": "Taylor |θ·∂L/∂θ|",
    }
    for method, frame in curves.groupby("method", sort=False):
        ax.plot(
            frame["sparsity"], frame["metric"], marker="o", ms=3, label=labels.get(method, method)
        )
    ax.set(
        xlabel="sparsity (fraction of conv/linear weights zeroed)",
        ylabel=f"held-out accuracy ({n_eval} images)",
        ylim=(0.0, 1.02),
        title="pruning by parameter-wise scores",
    )
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.legend(loc="lower left")
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((run / "config.json").read_text())
    trace = str(run / "trace.lmdb")
    train, test = load(cfg, train=True), load(cfg, train=False)
    n_explain = min(args.n_explain, len(test.y) - 1)
    explain_x, explain_y = test.x[:n_explain], test.y[:n_explain]
    eval_x, eval_y = test.x[n_explain:], test.y[n_explain:]

    def make_model() -> SmallCNN:
        return SmallCNN(num_classes=2, width=cfg["width"])

    # 1. the kernel, keeping per-weight scores for pruning
    start = time.perf_counter()
    question = dict(
        outputs="label",
        labels=explain_y,
        output_names=["correct"],
        step_windows=args.step_windows,
        keep=explaind_kernel.KeepOptions(param_scores=True),
    )
    result = (
        explaind_attr.saved_result_for(out / "result.explaind", trace, explain_x, **question)
        if args.reuse
        else None
    )
    if result is None:
        result = explaind_kernel.compute_kernel(
            trace, make_model(), explain_x, progress=not args.no_progress, **question
        )
    kernel_s = time.perf_counter() - start
    result.save(out / "result.explaind")
    err = np.abs(result.completeness_residual)
    print(result.completeness_line())

    # 2. the report, with training images
    with explaind_trace.open_trace(trace) as reader:
        samples = explaind_attr.samples_from_trace(reader, result.sample_ids)
        final = reader.final()
    report = explaind_attr.build_report(
        result, out / "report", samples=samples, title="ExPLAIND: small CNN on CIFAR-2"
    )

    # 3. pruning: the trained model (θ_T and its batch-norm statistics from the trace)
    model = make_model()
    model.load_state_dict({**final.params, **final.buffers}, strict=False)
    model.eval()
    prunable = [n for n, p in model.named_parameters() if p.dim() > 1]  # conv + linear weights
    taylor_x, taylor_y = train.x[: args.taylor_batch], train.y[: args.taylor_batch]

    def evaluate(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float((m(eval_x).argmax(-1) == eval_y).float().mean())

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        m.eval()
        return torch.nn.functional.cross_entropy(m(taylor_x), taylor_y)

    start = time.perf_counter()
    curves = explaind_attr.prune_curves(
        model, result, args.sparsities, evaluate, loss_fn=loss_fn, params=prunable, progress=False
    )
    prune_s = time.perf_counter() - start
    curves.to_csv(out / "pruning.csv", index=False)
    table = {
        m: dict(zip(f["sparsity"].round(4).astype(str), f["metric"]))
        for m, f in curves.groupby("method")
    }
    (out / "pruning.json").write_text(json.dumps(table, indent=2))
    figure = out / "pruning.png"
    plot(figure, curves, len(eval_y))

    summary = {
        "steps": result.num_steps,
        "n_explain": n_explain,
        "n_eval": len(eval_y),
        "training_samples": len(result.sample_ids),
        "kernel_seconds": kernel_s,
        "pruning_seconds": prune_s,
        "completeness_line": result.completeness_line(),
        "completeness_max_abs": float(err.max()),
        "completeness_mean_abs": float(err.mean()),
        "max_abs_fT": float(np.abs(result.fT).max()),
        "pruned_tensors": prunable,
        "pruning": table,
        "report": str(report.html),
        "figure": str(figure),
    }
    (out / "analysis.json").write_text(json.dumps(summary, indent=2))
    print("held-out accuracy by sparsity:")
    print(
        curves.pivot(index="sparsity", columns="method", values="metric").to_string(
            float_format="%.3f"
        )
    )
    print(f"report: {report.html}\nfigure: {figure}")
    return summary


if __name__ == "__main__":
    main()
