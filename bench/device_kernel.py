"""The kernel on a GPU, for bench/device_check.sh (one call, a few minutes).

    python bench/device_kernel.py record DIR          # the p = 97, d_model 128 trace
    python bench/device_kernel.py single DIR          # kernel on cuda: steps/s, efficiency
    torchrun --nproc-per-node N bench/device_kernel.py sharded DIR   # nccl over N GPUs
    python bench/device_kernel.py compare DIR         # sharded vs single, into the JSON

Efficiency = (the run's FLOPs from its work model ÷ the device's measured fp32 matmul rate) ÷
wall time. Results: bench/results/device_kernel.json and device_sharded.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.modular_addition.model import ModularAdditionTransformer, make_dataset  # noqa: E402

STEPS, BATCH, INPUTS = 30, 256, 16
RESULTS = ROOT / "bench" / "results"


def record(d: Path) -> None:
    import explaind_trace

    torch.manual_seed(0)
    tx, ty, vx, _ = make_dataset(97, 0.3, 0)
    model = ModularAdditionTransformer(97)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(1)
    with explaind_trace.record(model, opt, store=str(d / "p97.lmdb"), checkpoint_every=10):
        for _ in range(STEPS):
            idx = torch.randint(0, len(tx), (BATCH,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(tx[idx]), ty[idx]).backward()
            opt.step()
    np.save(d / "x.npy", vx[:INPUTS].numpy())


def matmul_rate(device: torch.device) -> float:
    a = torch.randn(4096, 4096, device=device)
    b = torch.randn(4096, 4096, device=device)
    a @ b
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096**3 / best


def single(d: Path) -> None:
    from explaind_kernel import compute_kernel

    dev = torch.device("cuda")
    x = torch.from_numpy(np.load(d / "x.npy"))
    out = {"device": torch.cuda.get_device_name(dev), "steps": STEPS, "inputs": INPUTS}
    out["matmul_flops_per_s"] = rate = matmul_rate(dev)
    for name, kw in {"gauss:2": {}, "gauss:2+kinks": {"kink_splits": 64}}.items():
        res = None
        for _ in range(2):  # the first run warms the kernels up
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            res = compute_kernel(
                str(d / "p97.lmdb"), ModularAdditionTransformer(97), x, device="cuda",
                progress=False, **kw,
            )  # fmt: skip
            torch.cuda.synchronize(dev)
            wall = time.perf_counter() - t0
        work = res.extra["work"]
        flops = sum(work["flops"].values())
        out[name] = {
            "wall_s": wall,
            "steps_per_s": STEPS / wall,
            "efficiency": flops / rate / wall,
            "phase_seconds": work["seconds"],
            "flops": work["flops"],
            "completeness_rel": float(res.completeness()[1]),
        }
        if name == "gauss:2":
            res.save(d / "single.explaind")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "device_kernel.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}))


def sharded(d: Path) -> None:
    import torch.distributed as dist

    from explaind_kernel.distributed import compute_kernel_sharded

    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    try:
        x = torch.from_numpy(np.load(d / "x.npy"))
        t0 = time.perf_counter()
        res = compute_kernel_sharded(
            str(d / "p97.lmdb"), ModularAdditionTransformer(97), x, device="cuda", progress=False
        )
        wall = time.perf_counter() - t0
        if dist.get_rank() == 0:
            res.save(d / "sharded.explaind")
            (d / "sharded_wall.txt").write_text(f"{wall} {dist.get_world_size()}")
    finally:
        dist.destroy_process_group()


def compare(d: Path) -> None:
    from explaind_kernel import KernelResult

    a, b = KernelResult.load(d / "single.explaind"), KernelResult.load(d / "sharded.explaind")
    wall, world = (d / "sharded_wall.txt").read_text().split()
    scale = float(np.max(np.abs(a.data))) or 1.0
    diff = {
        f: float(np.max(np.abs(getattr(a, f) - getattr(b, f)))) / scale
        for f in ("data", "components", "step_data", "nondata", "weight_decay")
    }
    out = {"world_size": int(world), "sharded_wall_s": float(wall), "max_rel_diff": diff}
    out["equal_to_rounding"] = all(v <= 1e-4 for v in diff.values())  # fp32 on a GPU
    (RESULTS / "device_sharded.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    verb, where = sys.argv[1], Path(sys.argv[2])
    {"record": record, "single": single, "sharded": sharded, "compare": compare}[verb](where)
