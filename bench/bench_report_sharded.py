"""Report and sharding benchmarks on the modular-addition run (p = 97, d_model 128, AdamW wd 1.0).

1. report: time to build the full report (HTML + markdown + CSV + plots) for a kernel result on
   N test inputs (all 97 logits), and for 10× more test inputs (the result's arrays tiled
   along the test axis: building a report costs the same for any values of the same shape);
2. sharding: kernel wall time on 1 process vs 2 processes (torchrun, gloo on CPU; nccl on GPUs)
   on the same trace, and the largest difference between the two results.

    python bench/bench_report_sharded.py            # writes bench/results/report_sharded.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
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
from explaind_attr import build_report  # noqa: E402
from explaind_kernel import KernelResult, compute_kernel  # noqa: E402

P = 97


def make_model() -> nn.Module:
    """Factory for `--model bench.bench_report_sharded:make_model`."""
    return ModularAdditionTransformer(P)


def record(path: str, steps: int) -> torch.Tensor:
    torch.manual_seed(0)
    tx, ty, vx, _ = make_dataset(P, 0.3, 0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    with explaind_trace.record(model, opt, store=path, checkpoint_every=max(1, steps // 4)):
        for _ in range(steps):
            idx = torch.randint(0, len(tx), (512,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(tx[idx]), ty[idx]).backward()
            opt.step()
    return vx


def tile(res: KernelResult, k: int) -> KernelResult:
    out = dataclasses.replace(res)
    for f in dataclasses.fields(res):
        v = getattr(res, f.name)
        if isinstance(v, np.ndarray) and v.ndim >= 2 and v.shape[0] == res.num_inputs:
            setattr(out, f.name, np.concatenate([v] * k, axis=0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--inputs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "report_sharded.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trace = str(Path(tmp) / "modadd.lmdb")
        vx = record(trace, args.steps)
        x = vx[: args.inputs]
        np.save(Path(tmp) / "x.npy", x.numpy())
        t0 = time.perf_counter()
        single = compute_kernel(trace, make_model(), x, progress=False, cpu_threads=1)
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", "29541", "-m", "explaind_kernel", trace, "--model",
             "bench.bench_report_sharded:make_model", "--inputs", str(Path(tmp) / "x.npy"),
             "--out", str(Path(tmp) / "sharded.explaind")],
            cwd=ROOT, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
        )  # fmt: skip
        t_two = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        sharded = KernelResult.load(Path(tmp) / "sharded.explaind")
        diff = float(
            np.max(np.abs(sharded.fT - sharded.reconstructed - single.completeness_residual))
        )
        reports = {}
        for k in (1, 10):
            res = tile(single, k)
            t0 = time.perf_counter()
            paths = build_report(res, Path(tmp) / f"report{k}")
            reports[f"{res.num_inputs}_inputs"] = {
                "seconds": time.perf_counter() - t0,
                "html_bytes": Path(paths.html).stat().st_size,
                "rows": int(res.f0.size),
            }
    result = {
        "config": {**vars(args), "out": Path(args.out).name, "p": P, "threads_per_process": 1},
        "kernel_1_process_s": t_single,
        "kernel_2_processes_s": t_two,
        "speedup": t_single / t_two,
        "sharded_vs_single_max_abs_diff": diff,
        "sharded_completeness": sharded.completeness_line(),
        "report": reports,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
