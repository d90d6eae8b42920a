"""Explain a recorded modular-addition run: kernel, report, and the grokking analysis.

    python examples/modular_addition/analyze.py --run runs/modadd

Reads the run written by train.py and

1. rewrites the correct-class logit of held-out pairs (a, b) as an exact kernel machine over
   the training path (one parameter slice per attention head and projection), saves the
   result and prints its completeness line;
2. writes the HTML report (training samples shown as their tokens, read back from the trace);
3. the grokking analysis (RUN/analysis/grokking.png, grokking.json, CSVs):
   - contribution of each model component (embeddings, each attention head, MLP,
     unembedding) to the explained logits per step window;
   - the terms per step window: training data, weight decay, the rest;
   - phases: memorisation (train accuracy reaches 99%) and generalisation (test accuracy
     reaches 90%) from the recorded accuracy curves, and the kernel's own phase boundaries
     (explaind_attr.phase_boundaries, "dominant" rule: the dominant component changes);
   - the alignment of the input embeddings with the unembedding through training, at
     parameters rebuilt from the trace by optimizer replay: the mean best |cosine| between a
     token's embedding W_E[a] and a class's unembedding W_U[c], and the linear CKA of their
     Gram matrices (1.0 when both share the same geometry, as a grokked model's do).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import explaind_attr
import explaind_kernel
import explaind_trace
from explaind_attr.app.demo.model import (
    ModularAdditionTransformer,
    component_groups,
    head_slices,
    make_dataset,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/modular_addition", help="run directory of train.py")
    p.add_argument("--out", default=None, help="analysis directory (default RUN/analysis)")
    p.add_argument("--n-test", type=int, default=32, help="held-out pairs to explain")
    p.add_argument("--step-windows", type=int, default=15, help="step windows of the joint views")
    p.add_argument("--nodes", type=int, default=2, help="Gauss-Legendre nodes per step")
    p.add_argument("--align-every", type=int, default=25, help="steps between alignment points")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the saved result.explaind of this trace instead of recomputing it",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_history(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.asarray([float(r[k]) for r in rows]) for k in rows[0]}


def first_step(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    hit = np.flatnonzero(values >= threshold)
    return int(steps[hit[0]]) if hit.size else None


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _centred_gram(m: torch.Tensor) -> torch.Tensor:
    g = m @ m.T
    n = g.shape[0]
    h = torch.eye(n, dtype=g.dtype) - 1.0 / n
    return h @ g @ h


def alignment(params: dict[str, torch.Tensor], p: int) -> tuple[float, float]:
    """(mean_a max_c |cos(W_E[a], W_U[c])|, linear CKA of the Gram matrices of W_E and W_U)."""
    w_e = params["embed.weight"][:p].double()  # number tokens only, not '='
    w_u = params["unembed.weight"].double()  # [p, d_model]: one row per class
    cos = _unit(w_e) @ _unit(w_u).T
    ge, gu = _centred_gram(w_e), _centred_gram(w_u)
    cka = float((ge * gu).sum() / (ge.norm() * gu.norm()).clamp_min(1e-30))
    return float(cos.abs().max(dim=1).values.mean()), cka


def alignment_curve(reader: explaind_trace.TraceReader, p: int, every: int) -> np.ndarray:
    """[K, 3] rows (step, best |cos|, CKA) at every `every` steps and the end, by replay."""
    rows = []
    for rs in reader.replay(with_state=False):
        if rs.index % every == 0:
            rows.append((rs.index, *alignment(rs.params, p)))
    rows.append((reader.num_steps, *alignment(reader.params_at(reader.num_steps), p)))
    return np.asarray(rows)


def group_windows(result: explaind_kernel.KernelResult, groups: dict[str, list[str]]) -> np.ndarray:
    """[G, W] each component group's contribution per step window, mean over explained rows."""
    view = explaind_attr.component_window_view(result, components="all")
    mean = view.values.mean(axis=(0, 1))  # [C, W]
    index = {name: i for i, name in enumerate(view.row_labels)}
    return np.stack([mean[[index[n] for n in names]].sum(axis=0) for names in groups.values()])


def plot(path: Path, history, phases, windows, groups_by_window, group_names, terms, align) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), dpi=80, layout="constrained")
    (ax_acc, ax_comp), (ax_terms, ax_align) = fig.subplots(2, 2, sharex=True)
    ax_acc.plot(history["step"], history["train_accuracy"], label="train")
    ax_acc.plot(history["step"], history["test_accuracy"], label="test")
    for name, step, style in (
        ("memorised", phases["memorisation_step"], "--"),
        ("generalised", phases["generalisation_step"], ":"),
    ):
        if step is not None:
            for ax in (ax_acc, ax_comp, ax_terms, ax_align):
                ax.axvline(step, color="0.4", ls=style, lw=1)
            ax_acc.text(step, 0.5, f" {name}", color="0.3", fontsize="small")
    ax_acc.set(ylabel="accuracy", title="memorisation, then generalisation", ylim=(-0.02, 1.02))
    ax_acc.legend(loc="lower right")

    edges = np.asarray(windows)
    widths = np.diff(edges)
    for name, row in zip(group_names, groups_by_window):
        ax_comp.step(edges, np.append(row / widths, row[-1] / widths[-1]), where="post", label=name)
    ax_comp.axhline(0, color="0.6", lw=0.8)
    ax_comp.set(ylabel="Δ logit per step", title="model components (mean over test pairs)")
    ax_comp.legend(fontsize="x-small", ncol=2)

    for name, row in terms.items():
        ax_terms.step(
            edges, np.append(row / widths, row[-1] / widths[-1]), where="post", label=name
        )
    ax_terms.axhline(0, color="0.6", lw=0.8)
    ax_terms.set(xlabel="step", ylabel="Δ logit per step", title="terms: data vs weight decay")
    ax_terms.legend(fontsize="small")

    ax_align.plot(align[:, 0], align[:, 2], label="CKA(W_E Gram, W_U Gram)")
    ax_align.plot(align[:, 0], align[:, 1], label="mean best |cos(W_E[a], W_U[c])|")
    ax_align.set(
        xlabel="step",
        ylabel="similarity",
        title="embedding / unembedding alignment",
        ylim=(0, 1.02),
    )
    ax_align.legend(fontsize="small", loc="lower right")
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((run / "config.json").read_text())
    trace = str(run / "trace.lmdb")

    _, _, test_x, test_y = make_dataset(cfg["p"], cfg["train_fraction"], cfg["seed"])
    pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(cfg["seed"]))
    pick = pick[: min(args.n_test, len(test_x))]
    model = ModularAdditionTransformer(cfg["p"], cfg["d_model"], cfg["n_heads"], cfg["d_mlp"])

    # 1. the kernel: f_T = f_0 + Σ_(sample, step) K + every other term, exactly
    start = time.perf_counter()
    question = dict(
        outputs="label",
        labels=test_y[pick],
        output_names=["correct"],
        slices=head_slices(model),
        step_windows=args.step_windows,
        quadrature=f"gauss:{args.nodes}",
    )
    result = (
        explaind_attr.saved_result_for(out / "result.explaind", trace, test_x[pick], **question)
        if args.reuse
        else None
    )
    if result is None:
        result = explaind_kernel.compute_kernel(
            trace, model, test_x[pick], progress=not args.no_progress, **question
        )
    kernel_s = time.perf_counter() - start
    result.save(out / "result.explaind")
    err = np.abs(result.completeness_residual)
    print(result.completeness_line())

    # 2. the report, with the training pairs as tokens
    with explaind_trace.open_trace(trace) as reader:
        samples = explaind_attr.samples_from_trace(reader, result.sample_ids)
        start = time.perf_counter()
        align = alignment_curve(reader, cfg["p"], args.align_every)
        align_s = time.perf_counter() - start
    report = explaind_attr.build_report(
        result,
        out / "report",
        samples=samples,
        title=f"ExPLAIND: one-layer Transformer on (a + b) mod {cfg['p']}",
    )

    # 3. grokking analysis
    history = load_history(run / "history.csv")
    phases = {
        "memorisation_step": first_step(history["step"], history["train_accuracy"], 0.99),
        "generalisation_step": first_step(history["step"], history["test_accuracy"], 0.9),
    }
    groups = component_groups(model)
    by_window = group_windows(result, groups)
    total_path = explaind_attr.component_window_view(result).values.mean(axis=(0, 1)).sum(axis=0)
    windowed = explaind_attr.step_attribution(result, edges="windows")
    per_term = dict(zip(windowed.terms, np.moveaxis(windowed.values.mean(axis=(0, 1)), -1, 0)))
    terms = {
        "training data": per_term["data"],
        "weight decay": per_term["weight_decay"],
        "rest": sum(v for k, v in per_term.items() if k not in ("data", "weight_decay")),
    }
    kernel_phases = explaind_attr.phase_boundaries(result, rule="dominant")
    counts = kernel_phases.groupby("step").size() if len(kernel_phases) else None
    dominant = [group_names_at(by_window, list(groups), w) for w in range(by_window.shape[1])]
    edges = [int(e) for e in result.window_edges]
    with open(out / "components_by_window.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["window_start", "window_stop", *groups, "dominant"])
        for i in range(by_window.shape[1]):
            w.writerow([edges[i], edges[i + 1], *by_window[:, i], dominant[i]])
    np.savetxt(
        out / "alignment.csv", align, delimiter=",", header="step,best_abs_cos,cka", comments=""
    )
    kernel_phases.to_csv(out / "kernel_phases.csv", index=False)
    figure = out / "grokking.png"
    plot(figure, history, phases, edges, by_window, list(groups), terms, align)

    summary = {
        "steps": result.num_steps,
        "n_test": len(pick),
        "training_samples": len(result.sample_ids),
        "kernel_seconds": kernel_s,
        "alignment_seconds": align_s,
        "completeness_line": result.completeness_line(),
        "completeness_max_abs": float(err.max()),
        "completeness_mean_abs": float(err.mean()),
        "max_abs_fT": float(np.abs(result.fT).max()),
        "groups_match_path": float(np.abs(by_window.sum(axis=0) - total_path).max()),
        "phases": phases,
        "kernel_phase_steps": {int(k): int(v) for k, v in counts.items()}
        if counts is not None
        else {},
        "dominant_component_by_window": dominant,
        "alignment_start": align[0, 1:].tolist(),
        "alignment_end": align[-1, 1:].tolist(),
        "report": str(report.html),
        "figure": str(figure),
    }
    (out / "grokking.json").write_text(json.dumps(summary, indent=2))
    print(
        f"phases: memorised at step {phases['memorisation_step']}, "
        f"generalised at step {phases['generalisation_step']}"
    )
    print("dominant component per window: " + " ".join(dominant))
    print(
        f"alignment (best |cos|, CKA): {align[0, 1]:.2f}, {align[0, 2]:.2f} at step 0 → "
        f"{align[-1, 1]:.2f}, {align[-1, 2]:.2f} at step {int(align[-1, 0])}"
    )
    print(f"report: {report.html}\nfigure: {figure}")
    return summary


def group_names_at(by_window: np.ndarray, names: list[str], w: int) -> str:
    """The component group with the largest |contribution| in window w."""
    return names[int(np.argmax(np.abs(by_window[:, w])))]


if __name__ == "__main__":
    main()
