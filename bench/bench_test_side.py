"""Test side alone: the integrated Jacobian of one step (gauss:2, and gauss:2 with kink splits),
the quadrature nodes in one row pass against one pass per node, alternated in one process.

Models as in bench_kernel_speed.py: the small SDPA Transformer (32 test inputs × 25 outputs)
and the p = 97 Transformer (4 inputs × 97 outputs, the bench's --reduced size), at their
initial parameters with a seeded random step Δθ (1e-2 per entry; kink splits then find a few
kinks per input). "per_node" is the route before node_pass.py (kept for models without
per-row points); both give the same J̄ to rounding, which this script checks (max relative
difference per route pair; with kink splits the probes' rounding may move a kink a little).
Wall and process CPU seconds are both recorded: on a shared machine the CPU time is the robust
figure.

    python bench/bench_test_side.py --threads 1 --repeats 5   # writes bench/results/test_side.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_kernel_speed import SDPATransformer  # noqa: E402
from explaind_kernel import jacobian  # noqa: E402
from explaind_kernel.functional import FunctionalModel, OutputSelector  # noqa: E402
from explaind_kernel.workmodel import clock_of  # noqa: E402

GAUSS2 = (np.array([0.5 - 0.5 / 3**0.5, 0.5 + 0.5 / 3**0.5]), np.array([0.5, 0.5]))


def setup(name: str):
    """(test side, θ, Δθ, buffers) of one model at float32."""
    torch.manual_seed(0)
    if name == "sdpa":
        model, x = SDPATransformer(), torch.randint(0, 25, (32, 6))
    else:
        from examples.modular_addition.model import ModularAdditionTransformer, make_dataset

        model, x = ModularAdditionTransformer(97), make_dataset(97, 0.3, 0)[2][:4]
    fm = FunctionalModel(model, output_module=None, device=torch.device("cpu"), dtype=torch.float32)
    theta = {k: p.detach() for k, p in fm.module.named_parameters()}
    bufs = dict(fm.module.named_buffers())
    sel = OutputSelector("all")
    with torch.no_grad():
        out = fm(theta, bufs, (x,))
    index = sel.prepare(None, x.shape[0], lambda: out)
    g = torch.Generator().manual_seed(1)
    delta = {k: 1e-2 * torch.randn(p.shape, generator=g) for k, p in theta.items()}
    return jacobian.TestSide(fm, sel, (x,), index), theta, delta, bufs


def one(side, theta, delta, bufs, kinks: int, fused: bool):
    """(seconds, kinks-phase seconds, J̄) of one step's integrated Jacobian."""
    side.fuse_nodes = fused
    clock = clock_of(side.fm)
    before = clock.seconds["kinks"]
    t0, c0 = time.perf_counter(), time.process_time()
    jb, _ = side.integrated_jacobian(theta, delta, bufs, *GAUSS2, kink_splits=kinks, kink_probes=8)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, clock.seconds["kinks"] - before, jb, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["sdpa", "p97"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "test_side.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_at_start": os.getloadavg()[0],
        "models": {},
    }
    for name in args.models:
        side, theta, delta, bufs = setup(name)
        entry: dict = {"rows": int(side.n * side.width(theta, bufs))}
        for config, kinks in (("gauss:2", 0), ("gauss:2+kinks", 64)):
            times: dict[str, list[float]] = {"node_pass": [], "per_node": []}
            kink_s: dict[str, list[float]] = {"node_pass": [], "per_node": []}
            cpu_s: dict[str, list[float]] = {"node_pass": [], "per_node": []}
            jbs = {}
            for route in times:  # warm-up (and the first call's per-row check)
                jbs[route] = one(side, theta, delta, bufs, kinks, route == "node_pass")[2]
            for _ in range(args.repeats):
                for route in times:
                    wall, ks, _, cpu = one(side, theta, delta, bufs, kinks, route == "node_pass")
                    times[route].append(wall)
                    cpu_s[route].append(cpu)
                    kink_s[route].append(ks)
            diff = max(
                float((jbs["node_pass"][k] - jbs["per_node"][k]).abs().max())
                / max(float(jbs["per_node"][k].abs().max()), 1e-30)
                for k in jbs["per_node"]
            )
            med = {r: statistics.median(v) for r, v in times.items()}
            entry[config] = {
                "seconds": times,
                "median_s": med,
                "kinks_median_s": {r: statistics.median(v) for r, v in kink_s.items()},
                # process CPU time: what this process spent, the robust figure when shared
                "cpu_seconds": cpu_s,
                "cpu_median_s": {r: statistics.median(v) for r, v in cpu_s.items()},
                "cpu_speedup_median": statistics.median(cpu_s["per_node"])
                / statistics.median(cpu_s["node_pass"]),
                "speedup_median": med["per_node"] / med["node_pass"],
                # per alternated repeat (robust to a loaded machine's drifts)
                "speedup_median_of_ratios": statistics.median(
                    a / b for a, b in zip(times["per_node"], times["node_pass"])
                ),
                "max_rel_difference": diff,
                "rules_still_on": bool(side.rules),
            }
            cpu = {r: round(statistics.median(v), 4) for r, v in cpu_s.items()}
            print(name, config, "wall", {r: round(v, 4) for r, v in med.items()}, "cpu", cpu)
        results["models"][name] = entry
    results["load_average_at_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(
        json.dumps(
            {
                m: {c: e[c]["cpu_speedup_median"] for c in e if c != "rows"}
                for m, e in results["models"].items()
            }
        )
    )


if __name__ == "__main__":
    main()
