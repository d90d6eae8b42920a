"""Auto choices against the fixed ones: `training_mode="auto"` against every fixed route, and
`cpu_threads="auto"` against 1 thread and all cores, on the kernel-speed bench models.

Issue #12 asks that each auto choice be never more than 20% slower than the best fixed choice
on the bench models. Every configuration runs in this one process, alternated (round-robin,
`--repeats` rounds), so a busy machine slows them alike; the figure is min wall time per
configuration and the ratio auto / best fixed.

    python bench/bench_auto_choices.py --repeats 2          # writes bench/results/auto_choices.json
    python bench/bench_auto_choices.py --models sdpa --repeats 1 --quick
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

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_kernel_speed import MODELS, REDUCED, record_run  # noqa: E402
from explaind_kernel import compute_kernel  # noqa: E402

ROUTES = ("rules", "per_sample", "jvp")


def _record(name: str, workdir: str, quick: bool, steps: int | None, inputs: int | None) -> tuple:
    """Record the bench model's run (reduced sizes, or `steps` / `inputs` when given) and
    return (trace, factory, test inputs)."""
    torch.manual_seed(0)
    model, fresh, opt, x, y, n_steps, batch, test_x = MODELS[name](quick)
    if name in REDUCED:
        n_steps, n = REDUCED[name][0], REDUCED[name][1]
        test_x = test_x[:n]
    n_steps = steps or n_steps
    test_x = test_x[:inputs] if inputs else test_x
    store = os.path.join(workdir, f"{name}.trace")
    record_run(model, opt, x, y, steps=n_steps, batch=batch, store=store)
    return store, fresh, test_x


def _configs(cores: int) -> dict[str, dict]:
    out = {f"route={r}": {"training_mode": r, "cpu_threads": 1} for r in ROUTES}
    out["route=auto"] = {"training_mode": "auto", "cpu_threads": 1}
    for t in sorted({1, cores}):
        out[f"threads={t}"] = {"training_mode": "auto", "cpu_threads": t}
    out["threads=auto"] = {"training_mode": "auto", "cpu_threads": "auto"}
    return out


def measure(
    name: str,
    *,
    repeats: int,
    quick: bool,
    workdir: str,
    steps: int | None = None,
    inputs: int | None = None,
) -> dict:
    """Min wall time per configuration (round-robin) and the auto / best-fixed ratios."""
    store, fresh, test_x = _record(name, workdir, quick, steps, inputs)
    cores = os.cpu_count() or 1
    configs = _configs(cores)
    walls: dict[str, list[float]] = {c: [] for c in configs}
    chosen: dict[str, object] = {}
    for _ in range(repeats):
        for cname, kw in configs.items():
            t0 = time.perf_counter()
            res = compute_kernel(store, fresh(), test_x, progress=False, **kw)
            walls[cname].append(time.perf_counter() - t0)
            extra = getattr(res, "extra", {}) or {}
            chosen[cname] = {
                "training_routes": extra.get("training_routes"),
                "cpu_threads": extra.get("cpu_threads"),
            }
            print(f"{name} {cname}: {walls[cname][-1]:.2f} s", flush=True)
    best = {c: min(v) for c, v in walls.items()}
    best_route = min(best[f"route={r}"] for r in ROUTES)
    best_threads = min(
        v for c, v in best.items() if c.startswith("threads=") and c != "threads=auto"
    )
    return {
        "wall_s": walls,
        "wall_min_s": best,
        "chosen": chosen,
        "route_auto_over_best": best["route=auto"] / best_route,
        "threads_auto_over_best": best["threads=auto"] / best_threads,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sdpa,p97,cnn")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the bench's)")
    ap.add_argument("--inputs", type=int, default=None, help="test inputs (default: the bench's)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "auto_choices.json"))
    args = ap.parse_args(argv)
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        load = f.read().strip()
    out: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_before": load,
        "command": "python bench/bench_auto_choices.py " + " ".join(argv or sys.argv[1:]),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            out["models"][name] = measure(
                name,
                repeats=args.repeats,
                quick=args.quick,
                workdir=workdir,
                steps=args.steps,
                inputs=args.inputs,
            )
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, m in out["models"].items():
        print(
            f"{name}: route auto/best {m['route_auto_over_best']:.2f}, "
            f"threads auto/best {m['threads_auto_over_best']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
