"""Auto choices against the fixed ones: `training_mode="auto"` against every fixed route, and
`cpu_threads="auto"` against 1 thread and all cores, on the kernel-speed bench models.

Issue #12 asks that each auto choice be never more than 20% slower than the best fixed choice
on the bench models. Every configuration runs in this one process, alternated (round-robin,
`--repeats` rounds), so a busy machine slows them alike; the figure is min wall time per
configuration and the ratio auto / best fixed. A run longer than `--cap-s` seconds (a hopeless
fixed route: the p = 97 jvp route ran over 5 minutes) is stopped and reported as "over cap",
and that configuration is not run again.

    python bench/bench_auto_choices.py --repeats 2          # writes bench/results/auto_choices.json
    python bench/bench_auto_choices.py --models sdpa --repeats 1 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
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

ROUTES = ("rules", "forward_ad", "per_sample", "jvp")
OVER_CAP = "over cap"


class OverCap(BaseException):
    """Raised in the main thread by the cap's alarm (a BaseException, so that no `except
    Exception` on the way swallows it)."""


def capped(cap_s: float, fn, *args, **kwargs):
    """fn(*args, **kwargs), or OVER_CAP when it runs longer than `cap_s` seconds (SIGALRM
    interrupts the kernel between two torch ops; its context managers clean up)."""

    def alarm(signum, frame):
        raise OverCap

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, cap_s)
    try:
        return fn(*args, **kwargs)
    except OverCap:
        return OVER_CAP
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


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
    cap_s: float = 300.0,
) -> dict:
    """Min wall time per configuration (round-robin) and the auto / best-fixed ratios; a
    configuration over `cap_s` seconds is "over cap" (and not run again)."""
    store, fresh, test_x = _record(name, workdir, quick, steps, inputs)
    cores = os.cpu_count() or 1
    configs = _configs(cores)
    walls: dict[str, list] = {c: [] for c in configs}
    chosen: dict[str, object] = {}
    for _ in range(repeats):
        for cname, kw in configs.items():
            if OVER_CAP in walls[cname]:
                continue
            t0 = time.perf_counter()
            res = capped(cap_s, compute_kernel, store, fresh(), test_x, progress=False, **kw)
            if res == OVER_CAP:
                walls[cname].append(OVER_CAP)
                print(f"{name} {cname}: over the cap of {cap_s:g} s", flush=True)
                continue
            walls[cname].append(time.perf_counter() - t0)
            extra = getattr(res, "extra", {}) or {}
            chosen[cname] = {
                "training_routes": extra.get("training_routes"),
                "cpu_threads": extra.get("cpu_threads"),
            }
            print(f"{name} {cname}: {walls[cname][-1]:.2f} s", flush=True)
    best = {c: (OVER_CAP if OVER_CAP in v else min(v)) for c, v in walls.items()}
    timed = {c: v for c, v in best.items() if v != OVER_CAP}
    best_route = min((timed[f"route={r}"] for r in ROUTES if f"route={r}" in timed), default=None)
    best_threads = min(
        (v for c, v in timed.items() if c.startswith("threads=") and c != "threads=auto"),
        default=None,
    )
    return {
        "cap_s": cap_s,
        "wall_s": walls,
        "wall_min_s": best,
        "chosen": chosen,
        "route_auto_over_best": _ratio(timed.get("route=auto"), best_route),
        "threads_auto_over_best": _ratio(timed.get("threads=auto"), best_threads),
    }


def _ratio(auto: float | None, best: float | None) -> float | None:
    """auto / best, or None when either ran over the cap."""
    return None if auto is None or best is None else auto / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sdpa,p97,cnn")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the bench's)")
    ap.add_argument("--inputs", type=int, default=None, help="test inputs (default: the bench's)")
    ap.add_argument("--cap-s", type=float, default=300.0, help="stop a run after this long")
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
                cap_s=args.cap_s,
            )
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, m in out["models"].items():
        r, t = m["route_auto_over_best"], m["threads_auto_over_best"]
        print(
            f"{name}: route auto/best {OVER_CAP if r is None else f'{r:.2f}'}, "
            f"threads auto/best {OVER_CAP if t is None else f'{t:.2f}'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
