"""Explain the loss of held-out sentences of a recorded language-model run, exactly.

    python -m examples.language_model.analyze --run runs/lm

Reads the run written by train.py and

1. rewrites the mean next-token cross-entropy of each of `--n-explain` held-out sentences as
   an exact kernel machine over the recorded Trainer run (target: ``sequence_loss`` through
   ``outputs=fn(output, labels)``), saves the result and prints its completeness line;
2. checks it against the real target: the Hugging Face model itself (not the kernel's copy)
   evaluated at θ_T read from the trace, float64;
3. reads off the three views the issue asks for: per training sentence (are the sentences
   that lowered a held-out sentence's loss most those of its own rule?), per layer
   (embeddings, each transformer block, the final norm) and per step window, and the data
   term per window split into the sentences of the held-out sentence's own rule and the rest;
4. writes the HTML report (training sentences shown as text, grouped by rule) and
   RUN/analysis/language_model.json, layers_by_window.csv, layers.png.
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

from .corpus import STEPS, sequence_loss
from .model import block_groups
from .train import datasets, language_of, model_of


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/language_model", help="run directory of train.py")
    p.add_argument("--out", default=None, help="analysis directory (default RUN/analysis)")
    p.add_argument("--n-explain", type=int, default=8, help="held-out sentences to explain")
    p.add_argument("--step-windows", type=int, default=8, help="step windows of the views")
    p.add_argument("--nodes", type=int, default=2, help="Gauss-Legendre nodes per step")
    p.add_argument("--top", type=int, default=10, help="training sentences per explanation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--training-mode",
        default="auto",
        help="the kernel's training-side route (KernelConfig.training_mode); auto times them",
    )
    p.add_argument(
        "--cpu-threads",
        default="auto",
        help="KernelConfig.cpu_threads: auto (timed), or a number (bitwise reproducible runs "
        "pin this and --training-mode: timed choices may sum in another order)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def rule_of(row: torch.Tensor, numbers: int) -> int:
    """The rule index of a sentence (its second token)."""
    return int(row[1]) - numbers - 3


def real_target(cfg: dict[str, Any], reader, inputs: dict, labels: torch.Tensor) -> np.ndarray:
    """The explained values recomputed independently of the kernel: the Hugging Face model,
    loaded with θ_T from the trace, in float64 and eval mode."""
    model = model_of(cfg).double().eval()
    final = {k: v.double() for k, v in reader.params_at(reader.num_steps).items()}
    missing = model.load_state_dict(final, strict=False).missing_keys
    untied = [k for k in missing if not k.endswith("lm_head.weight")]  # lm_head is wte
    if untied:
        raise RuntimeError(f"the trace holds no final value for {untied}; is it this run's?")
    with torch.no_grad():
        logits = model(**inputs).logits
        return sequence_loss(logits, labels).numpy()


def layer_windows(result, groups: dict[str, list[str]]) -> np.ndarray:
    """[N, G, W] each layer's contribution (all terms) per step window, per sentence."""
    view = explaind_attr.component_window_view(result, components="all")
    index = {name: i for i, name in enumerate(view.row_labels)}
    vals = view.values[:, 0]  # [N, C, W], one explained output
    return np.stack(
        [vals[:, [index[n] for n in names]].sum(axis=1) for names in groups.values()], 1
    )


def same_rule_share(result, rules_train: dict, rules_test: list[int], top: int) -> dict:
    """For each explained sentence, the share of its `top` most loss-lowering training
    sentences (most negative contributions) that have its rule, against the share of the
    training set that has it (what chance gives)."""
    ids = list(result.sample_ids)
    sample_rule = np.asarray([rules_train[s] for s in ids])
    shares, chance = [], []
    for n, r in enumerate(rules_test):
        order = np.argsort(result.data[n, 0])[:top]  # most negative first: lowered the loss
        shares.append(float(np.mean(sample_rule[order] == r)))
        chance.append(float(np.mean(sample_rule == r)))
    return {"top": top, "share": shares, "chance": chance}


def rule_split_by_window(result, rules_train: dict, rules_test: list[int]) -> dict:
    """Per step window, the training data's contribution to the held-out losses split into
    the sentences of the held-out sentence's own rule and all the others (mean over the
    explained sentences; the two add up to the data term of the window)."""
    sample_rule = np.asarray([rules_train[s] for s in result.sample_ids])
    sw = result.sample_window[:, 0]  # [N, S, W]
    own = [sw[n][sample_rule == r].sum(axis=0) for n, r in enumerate(rules_test)]
    other = [sw[n][sample_rule != r].sum(axis=0) for n, r in enumerate(rules_test)]
    return {
        "own_rule": np.mean(own, axis=0).tolist(),
        "other_rules": np.mean(other, axis=0).tolist(),
    }


def plot(path: Path, edges, names, by_window, terms) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=80, layout="constrained")
    ax_l, ax_t = fig.subplots(1, 2, sharex=True)
    e = np.asarray(edges)
    w = np.diff(e)
    for name, row in zip(names, by_window):
        ax_l.step(e, np.append(row / w, row[-1] / w[-1]), where="post", label=name)
    ax_l.axhline(0, color="0.6", lw=0.8)
    ax_l.set(xlabel="step", ylabel="Δ loss per step", title="by layer (mean over sentences)")
    ax_l.legend(fontsize="small")
    for name, row in terms.items():
        ax_t.step(e, np.append(row / w, row[-1] / w[-1]), where="post", label=name)
    ax_t.axhline(0, color="0.6", lw=0.8)
    ax_t.set(xlabel="step", title="by training sentences (mean over sentences)")
    ax_t.legend(fontsize="small")
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((run / "config.json").read_text())
    trace = str(run / "trace.lmdb")
    lang = language_of(cfg)
    _, held_out = datasets(cfg)
    n = min(args.n_explain, len(held_out))
    inputs = {"input_ids": held_out.ids[:n], "attention_mask": held_out.mask[:n]}
    labels = held_out.labels[:n]
    model = model_of(cfg)
    groups = block_groups(model)

    # 1. the kernel: loss_T = loss_0 + Σ_(sentence, step) K + every other term, exactly
    start = time.perf_counter()
    result = explaind_kernel.compute_kernel(
        trace,
        model,
        inputs,
        outputs=sequence_loss,
        labels=labels,
        output_names=["sequence loss"],
        step_windows=args.step_windows,
        quadrature=f"gauss:{args.nodes}",
        keep=explaind_kernel.KeepOptions(sample_window=True),  # per (sentence, window) too
        training_mode=args.training_mode,
        cpu_threads=args.cpu_threads if args.cpu_threads == "auto" else int(args.cpu_threads),
        progress=not args.no_progress,
    )
    kernel_s = time.perf_counter() - start
    result.save(out / "result.explaind")
    err = np.abs(result.completeness_residual)
    print(result.completeness_line())

    with explaind_trace.open_trace(trace) as reader:
        # 2. the real target at θ_T, recomputed by the Hugging Face model itself
        real = real_target(cfg, reader, inputs, labels)
        rows = {sid: reader.sample(sid) for sid in result.sample_ids}
    first = {sid: (r[0] if isinstance(r, tuple) else r) for sid, r in rows.items()}
    rules_train = {sid: rule_of(row, lang.numbers) for sid, row in first.items()}
    rules_test = [rule_of(row, lang.numbers) for row in held_out.ids[:n]]
    decomposed = result.f0 + result.data.sum(-1)
    for term in explaind_kernel.result.TERM_FIELDS:
        decomposed = decomposed + getattr(result, term)
    vs_real = np.abs(decomposed[:, 0] - real)

    # 3. views: per training sentence, per layer, per step window
    shares = same_rule_share(result, rules_train, rules_test, args.top)
    shares["by_window"] = rule_split_by_window(result, rules_train, rules_test)
    by_window = layer_windows(result, groups)  # [N, G, W]
    mean_layers = by_window.mean(axis=0)
    windowed = explaind_attr.step_attribution(result, edges="windows")
    per_term = dict(zip(windowed.terms, np.moveaxis(windowed.values.mean(axis=(0, 1)), -1, 0)))
    split = shares["by_window"]
    terms = {
        "data: sentences of its own rule": np.asarray(split["own_rule"]),
        "data: the other rules": np.asarray(split["other_rules"]),
        "rest (weight decay, …)": sum(v for k, v in per_term.items() if k != "data"),
    }
    edges = [int(e) for e in result.window_edges]
    with open(out / "layers_by_window.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["window_start", "window_stop", *groups])
        for i in range(mean_layers.shape[1]):
            w.writerow([edges[i], edges[i + 1], *mean_layers[:, i]])
    figure = out / "layers.png"
    plot(figure, edges, list(groups), mean_layers, terms)

    # 4. the report, training sentences as text, grouped by rule
    rule_names = {sid: f"rule {STEPS[r]:+d}" for sid, r in rules_train.items()}
    report = explaind_attr.build_report(
        result,
        out / "report",
        samples={sid: lang.decode(row) for sid, row in first.items()},
        groups=rule_names,
        train_labels=rule_names,
        inputs=held_out.ids[:n],
        component_groups=groups,
        title="ExPLAIND: a tiny GPT-2 on arithmetic progressions (Hugging Face Trainer)",
    )
    summary = {
        "steps": result.num_steps,
        "n_explain": n,
        "training_sentences": len(result.sample_ids),
        "kernel_seconds": kernel_s,
        "completeness_line": result.completeness_line(),
        "completeness_max_abs": float(err.max()),
        "max_abs_fT": float(np.abs(result.fT).max()),
        "real_target": real.tolist(),
        "fT_vs_real_max_abs": float(np.abs(result.fT[:, 0] - real).max()),
        "decomposition_vs_real_max_abs": float(vs_real.max()),
        "loss_change": (result.fT - result.f0)[:, 0].tolist(),
        "terms_max_abs": {
            t: float(np.abs(getattr(result, t)).max()) for t in explaind_kernel.result.TERM_FIELDS
        },
        "layers": list(groups),
        "layer_totals": mean_layers.sum(axis=1).tolist(),
        "layers_match_path": float(
            np.abs(by_window.sum(axis=(1, 2)) - result.components[:, 0].sum(axis=1)).max()
        ),
        "same_rule": shares,
        # own rule + other rules = the data term of each window (a partition of the samples)
        "rule_split_matches_data": float(
            np.abs(
                np.asarray(shares["by_window"]["own_rule"])
                + np.asarray(shares["by_window"]["other_rules"])
                - per_term["data"]
            ).max()
        ),
        "training_routes": result.extra.get("training_routes"),
        "report": str(report.html),
        "figure": str(figure),
    }
    (out / "language_model.json").write_text(json.dumps(summary, indent=2))
    print(
        f"real target at θ_T vs decomposition: max |diff| {summary['decomposition_vs_real_max_abs']:.2e}"
    )
    print(
        f"top-{args.top} loss-lowering training sentences with the held-out sentence's rule: "
        f"{np.mean(shares['share']):.2f} (chance {np.mean(shares['chance']):.2f})"
    )
    print(
        "data contribution per step window, own rule / other rules: "
        + " ".join(f"{a:+.3f}/{b:+.3f}" for a, b in zip(split["own_rule"], split["other_rules"]))
    )
    print(
        "per layer (Δ loss, mean over sentences): "
        + ", ".join(f"{g} {v:+.3f}" for g, v in zip(groups, summary["layer_totals"]))
    )
    print(f"report: {report.html}\nfigure: {figure}")
    return summary


if __name__ == "__main__":
    main()
