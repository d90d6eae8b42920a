"""Quadrature study at the issue's scale, by forward-mode JVPs (explaind_kernel.compare_quadrature).

Modular addition (p = 97, d_model 128, ReLU MLP, AdamW lr 1e-3 wd 1.0 betas (0.9, 0.98), batch
512), 1000 steps, 256 held-out inputs, all 97 logits. For each rule: the kernel's quadrature
error max |f(θ_T) − f(θ_0) − Σ_t J̄_t·Δθ_t| over all rows (absolute and relative to max |f(θ_T)|)
and the Jacobian evaluations per test input per step the kernel would spend with that rule.
The error is exactly the kernel's quadrature_error term for the rule
(tests/kernel/test_compare_quadrature.py), but costs one JVP per node instead of one
backward per explained output, which is what makes the 1000-step, 256-input study fit on a CPU.

Per-input maxima are stored, so runs on a subset of inputs (`--inputs 16`, for the costlier
kink-split rules) can be compared with the full runs on the same inputs.

    python bench/bench_quadrature.py --trace /tmp/modadd1000.lmdb \
        --rules gauss:1,gauss:2,gauss:3,midpoint:10 --out bench/results/quadrature_plain.json
    python bench/bench_quadrature.py --trace /tmp/modadd1000.lmdb --rules midpoint:100 ...
    python bench/bench_quadrature.py --trace /tmp/modadd1000.lmdb --inputs 16 \
        --rules gauss:1+kinks,gauss:2+kinks ...
    python bench/bench_quadrature.py --summarize A.json B.json C.json --out summary.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_kernel import record  # noqa: E402
from examples.modular_addition.model import ModularAdditionTransformer, make_dataset  # noqa: E402
from explaind_kernel import compare_quadrature  # noqa: E402


def summarize(paths: list[str], out: str) -> dict:
    """Merge runs of this script into one table: every rule's relative error on the inputs each
    run shares (the first n held-out inputs), with its evaluations per step and the ratios to
    midpoint-100 that the issue's target is stated in."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    sizes = sorted({r["config"]["inputs"] for r in runs})
    table: dict[str, dict] = {}
    for n in sizes:
        rows = {}
        for run in runs:
            if run["config"]["inputs"] < n:
                continue
            scale = max(run["per_input_max_abs_fT"][:n])
            for rule, r in run["rules"].items():
                rows[rule] = {
                    "jacobian_evaluations_per_step": r["jacobian_evaluations_per_step"],
                    "probe_passes_per_step": r["probe_passes_per_step"],
                    "rel_error": max(r["per_input_max_abs"][:n]) / scale,
                }
        ref = rows.get("midpoint:100")
        if ref:
            for r in rows.values():
                r["error_vs_midpoint100"] = r["rel_error"] / ref["rel_error"]
                r["evaluations_vs_midpoint100"] = r["jacobian_evaluations_per_step"] / 100
        table[f"first_{n}_inputs"] = rows
    report = {"runs": paths, "by_inputs": table}
    Path(out).write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trace", help="trace path; recorded here if missing")
    ap.add_argument(
        "--summarize", nargs="+", metavar="JSON", help="merge earlier runs' JSON into --out"
    )
    ap.add_argument("--p", type=int, default=97)
    ap.add_argument("--steps", type=int, default=1000, help="steps to record (new trace only)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--inputs", type=int, default=256, help="held-out inputs (the first N)")
    ap.add_argument("--outputs", default="all", choices=["all", "label"])
    ap.add_argument("--rules", default="gauss:1,gauss:2,gauss:3,midpoint:10,midpoint:100")
    ap.add_argument("--kink-probes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.summarize:
        print(json.dumps(summarize(args.summarize, args.out)["by_inputs"], indent=2))
        return 0
    if not args.trace:
        ap.error("--trace is required (or --summarize)")
    torch.set_num_threads(args.threads)
    record_s = None
    if not Path(args.trace).exists():
        _, _, record_s = record(args.trace, p=args.p, steps=args.steps, batch=args.batch, seed=0)
    _, _, vx, vy = make_dataset(args.p, 0.3, 0)
    x, labels = vx[: args.inputs], vy[: args.inputs]
    t0 = time.perf_counter()
    results = compare_quadrature(
        args.trace,
        ModularAdditionTransformer(args.p),
        x,
        args.rules.split(","),
        outputs=args.outputs,
        labels=labels if args.outputs == "label" else None,
        kink_probes=args.kink_probes,
        cpu_threads=args.threads,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    wall = time.perf_counter() - t0
    fT_in = np.abs(results[0].fT).max(1)
    report = {
        # file names only: a result file names no path of the machine it ran on
        "config": {**vars(args), "trace": Path(args.trace).name, "out": Path(args.out).name},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "record_seconds": record_s,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": int(results[0].fT.size),
        "per_input_max_abs_fT": fT_in.tolist(),
        "rules": {
            r.rule: {**r.to_dict(), "per_input_max_abs": np.abs(r.error).max(1).tolist()}
            for r in results
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({r.rule: r.to_dict() for r in results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
