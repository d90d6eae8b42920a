"""Kernel benchmark: modular addition (p = 97, d_model 128, AdamW wd 1.0, betas (0.9, 0.98)).

Records a run, then
1. compares quadrature rules on the quantity they change — the error of
   f(x; θ_0) + Σ_t J̄_t·Δθ_t against f(x; θ_T) (the kernel reports that error per step as its
   quadrature term, so the full decomposition stays complete whatever the rule) — for Gauss 1/2/3
   and midpoint 10/100, with the number of Jacobian evaluations each needs;
   — and for Gauss 1/2 with each step cut at the ReLU kinks of each input (kink_splits), where
   the evaluations per step are measured (they grow with the number of kinks);
2. runs the full kernel (data, components, steps) with Gauss-2, with Gauss 1/2 + kink splits and
   adaptive Gauss-2, and reports wall time, peak memory, steps per second and completeness.

Full scale (the issue's configuration) is `--steps 1000 --test-inputs 256` on a GPU; the CPU
default is reduced so it finishes in minutes on 2 cores. Results: bench/results/kernel.json.
The quadrature comparison at full scale on a CPU is bench/bench_quadrature.py (forward-mode
JVPs give the same error for a fraction of the cost).

    python bench/bench_kernel.py                # CPU default
    python bench/bench_kernel.py --full         # 1000 steps, 256 test inputs, all logits
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explaind_trace  # noqa: E402
from examples.modular_addition.model import ModularAdditionTransformer, make_dataset  # noqa: E402
from explaind_kernel import compute_kernel  # noqa: E402
from explaind_kernel.functional import FunctionalModel, OutputSelector, to_compute  # noqa: E402
from explaind_kernel.jacobian import TestSide  # noqa: E402
from explaind_kernel.quadrature import Quadrature  # noqa: E402

RULES = ["gauss:1", "gauss:2", "gauss:3", "midpoint:10", "midpoint:100"]
# rule -> (kink_splits, kink_probes): the rule on every piece between each input's ReLU kinks
KINK_RULES = {
    "gauss:1+kinks": (64, 8),
    "gauss:2+kinks": (64, 8),
}


def record(
    path: str, *, p: int, steps: int, batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(seed)
    tx, ty, vx, vy = make_dataset(p, 0.3, seed)
    model = ModularAdditionTransformer(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with explaind_trace.record(model, opt, store=path, checkpoint_every=100):
        for _ in range(steps):
            idx = torch.randint(0, len(tx), (min(batch, len(tx)),), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(tx[idx]), ty[idx]).backward()
            opt.step()
    return vx, vy, time.perf_counter() - t0


def quadrature_study(
    path: str,
    p: int,
    test_x: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    outputs: str,
) -> dict:
    """Error of f_0 + Σ J̄_t Δθ_t per rule, on the same replayed path."""
    reader = explaind_trace.open_trace(path)
    fm = FunctionalModel(
        ModularAdditionTransformer(p), output_module=None, device=device, dtype=torch.float32
    )
    x = to_compute(test_x, device, torch.float32)
    side = TestSide(fm, OutputSelector(outputs), (x,), labels.to(device))
    names = RULES + list(KINK_RULES)
    quads = {r: Quadrature.parse(r.split("+")[0]) for r in names}
    lin = {r: None for r in names}
    seconds = {r: 0.0 for r in names}
    evals = {r: 0.0 for r in names}
    steps = 0
    final = reader.final()
    theta_T = {k: to_compute(v, device, torch.float32) for k, v in final.params.items()}
    bufs: dict = {}
    f0 = fT = None
    prev = None
    for start, stop in reader.segments():
        for rs in reader.replay(start, stop, with_state=False):
            th = {k: to_compute(v, device, torch.float32) for k, v in rs.params.items()}
            nxt = {k: to_compute(v, device, torch.float32) for k, v in rs.next_params.items()}
            delta = {k: nxt[k] - th[k] for k in th}
            steps += 1
            if f0 is None:
                f0 = side.values(th, bufs).double().cpu().numpy()
            for r, q in quads.items():
                t0 = time.perf_counter()
                nodes, weights = q.points()
                jbar, spent = side.integrated_jacobian(
                    th,
                    delta,
                    bufs,
                    nodes,
                    weights,
                    kink_splits=KINK_RULES.get(r, (0, 0))[0],
                    kink_probes=KINK_RULES.get(r, (0, 4))[1],
                )
                evals[r] += spent
                v = sum(
                    (jbar[k].reshape(jbar[k].shape[0], -1).double() @ delta[k].reshape(-1).double())
                    for k in th
                )
                lin[r] = v if lin[r] is None else lin[r] + v
                seconds[r] += time.perf_counter() - t0
            prev = nxt
    del prev
    fT = side.values(theta_T, bufs).double().cpu().numpy()
    scale = float(np.max(np.abs(fT)))
    out = {}
    for r in names:
        err = fT - (f0 + lin[r].cpu().numpy())
        out[r] = {
            "jacobian_evaluations_per_step": evals[r] / steps,
            "max_abs_error": float(np.max(np.abs(err))),
            "rel_error": float(np.max(np.abs(err)) / scale),
            "seconds": seconds[r],
        }
    reader.close()
    return out


def full_kernel(
    path: str,
    p: int,
    test_x: torch.Tensor,
    rule: str,
    device: torch.device,
    threads: int | None,
    adaptive_tol: float | None = None,
    kink_splits: int = 0,
) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = compute_kernel(
        path,
        ModularAdditionTransformer(p),
        test_x,
        outputs="all",
        quadrature=rule,
        device=str(device),
        progress=False,
        cpu_threads=threads,
        adaptive_tol=adaptive_tol,
        max_nodes=64,
        kink_splits=kink_splits,
    )
    wall = time.perf_counter() - t0
    max_abs, rel = res.completeness()
    machine_err = res.fT - (res.reconstructed - res.quadrature_error)
    return {
        "rule": rule
        + (f" adaptive tol={adaptive_tol:g}" if adaptive_tol is not None else "")
        + (f" kink_splits={kink_splits}" if kink_splits else ""),
        "jacobian_evaluations_per_step": float(np.mean(res.step_nodes)),
        "wall_s": wall,
        "steps_per_s": res.num_steps / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else None,
        "completeness_max_abs": max_abs,
        "completeness_rel": rel,
        "kernel_machine_rel_error": float(np.max(np.abs(machine_err)) / np.max(np.abs(res.fT))),
        "rows": int(res.f0.size),
        "training_samples": len(res.sample_ids),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--p", type=int, default=97)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--test-inputs", type=int, default=1, help="full kernel: inputs (all logits)")
    ap.add_argument("--quad-inputs", type=int, default=4, help="quadrature study: inputs")
    ap.add_argument("--adaptive-tol", type=float, default=1e-5, help="also run gauss:2 adaptive")
    ap.add_argument("--quad-outputs", default="label", choices=["label", "all"])
    ap.add_argument("--full", action="store_true", help="the issue's scale: 1000 steps, 256 inputs")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads for the kernel")
    ap.add_argument("--kernel-rules", default="gauss:2")
    ap.add_argument("--quad-only", action="store_true", help="skip the full-kernel runs")
    ap.add_argument(
        "--kink-rules",
        default="gauss:1,gauss:2",
        help="full-kernel runs with kink_splits=64 ('' for none)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernel.json"))
    args = ap.parse_args(argv)
    if args.full:
        args.steps, args.test_inputs, args.quad_inputs, args.quad_outputs = 1000, 256, 256, "all"
        args.kernel_rules = "gauss:1,gauss:2,gauss:3"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "modadd.lmdb")
        vx, vy, train_s = record(path, p=args.p, steps=args.steps, batch=args.batch, seed=0)
        test_x = vx[: args.test_inputs]
        quad = quadrature_study(
            path, args.p, vx[: args.quad_inputs], vy[: args.quad_inputs], device, args.quad_outputs
        )
        kernels = [
            full_kernel(path, args.p, test_x, r, device, args.threads)
            for r in ([] if args.quad_only else args.kernel_rules.split(","))
        ]
        kernels += [
            full_kernel(path, args.p, test_x, r, device, args.threads, kink_splits=64)
            for r in ([] if args.quad_only or not args.kink_rules else args.kink_rules.split(","))
        ]
        if args.adaptive_tol and not args.quad_only:
            kernels.append(
                full_kernel(
                    path, args.p, test_x, "gauss:2", device, args.threads, args.adaptive_tol
                )
            )
    nparams = sum(p.numel() for p in ModularAdditionTransformer(args.p).parameters())
    report = {
        "config": {**vars(args), "parameters": nparams, "device": str(device)},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None,
        },
        "record_seconds": train_s,
        "quadrature": quad,
        "kernel": kernels,
        "vs_midpoint100": {
            r: {
                "error_ratio": quad[r]["rel_error"]
                / max(quad["midpoint:100"]["rel_error"], 1e-300),
                "jacobian_evaluation_ratio": quad[r]["jacobian_evaluations_per_step"] / 100,
            }
            for r in ["gauss:2", *KINK_RULES]
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"quadrature": quad, "kernel": kernels}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
