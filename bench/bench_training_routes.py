"""Training-side routes on the kernel-speed bench's CNN (train-mode batch norm couples the
samples, so the per-sample layer rules do not hold): the training phase's time per route,
alternated in one process (round-robin, `--repeats` rounds), and the largest difference of
each route's data attributions from the first route's.

    python bench/bench_training_routes.py --repeats 3   # writes bench/results/training_routes.json

A route named "ROUTE@64" runs with blocks of 64 rows whatever the activations' size
(train_blocks.BLOCK_BYTES lifted for that run): "jvp@64" is the code before the forward-mode
route, which `rules` and `auto` handed this model to (the double-backward trick in blocks of
`block_rows` = 64); "per_sample@64" the per-sample route in the old 64-row blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import explaind_kernel.train_blocks as train_blocks  # noqa: E402
from bench.bench_kernel_speed import MODELS, REDUCED, record_run  # noqa: E402
from explaind_kernel import compute_kernel  # noqa: E402


def run(store: str, model, test_x, label: str):
    """compute_kernel with the route `label` names ("ROUTE" or "ROUTE@64")."""
    route, _, fixed = label.partition("@")
    saved = train_blocks.BLOCK_BYTES
    if fixed:
        train_blocks.BLOCK_BYTES = 2**62  # every block has block_rows rows
    try:
        return compute_kernel(
            store,
            model,
            test_x,
            progress=False,
            cpu_threads=1,
            training_mode=route,
            block_rows=int(fixed or 64),
        )
    finally:
        train_blocks.BLOCK_BYTES = saved


def measure(name: str, routes: list[str], *, repeats: int, steps: int, inputs: int) -> dict:
    """Training-phase and wall seconds per route (round-robin) and max |Δ data| / max |data|."""
    torch.manual_seed(0)
    model, fresh, opt, x, y, _, batch, test_x = MODELS[name](False)
    test_x = test_x[:inputs]
    out: dict = {"steps": steps, "batch": batch, "test_inputs": len(test_x), "routes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, f"{name}.trace")
        record_run(model, opt, x, y, steps=steps, batch=batch, store=store)
        data: dict[str, np.ndarray] = {}
        for _ in range(repeats):
            for route in routes:
                t0 = time.perf_counter()
                res = run(store, fresh(), test_x, route)
                wall = time.perf_counter() - t0
                entry = out["routes"].setdefault(route, {"training_s": [], "wall_s": []})
                entry["training_s"].append(res.extra["work"]["seconds"]["training"])
                entry["wall_s"].append(wall)
                entry["answered_by"] = res.extra.get("training_routes")
                data[route] = res.data
                print(f"{name} {route}: training {entry['training_s'][-1]:.2f} s", flush=True)
    ref = data[routes[0]]
    for route, entry in out["routes"].items():
        entry["training_min_s"] = min(entry["training_s"])
        entry["wall_min_s"] = min(entry["wall_s"])
        entry["data_rel_diff"] = float(np.abs(data[route] - ref).max() / np.abs(ref).max())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--routes", default="jvp@64,forward_ad,per_sample,per_sample@64,auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=REDUCED["cnn"][0])
    ap.add_argument("--inputs", type=int, default=REDUCED["cnn"][1])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "training_routes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        load = f.read().strip()
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_before": load,
        "command": "python bench/bench_training_routes.py " + " ".join(argv or sys.argv[1:]),
        args.model: measure(
            args.model,
            args.routes.split(","),
            repeats=args.repeats,
            steps=args.steps,
            inputs=args.inputs,
        ),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for route, e in result[args.model]["routes"].items():
        print(f"{route:11s} training min {e['training_min_s']:.2f} s  {e['answered_by']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
