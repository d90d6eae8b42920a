"""Kernel speed: wall time, time and efficiency per phase, before and after, on three models.

Models (each recorded here, then explained with gauss:2 and with gauss:2 + kink splits):
  sdpa  a one-layer Transformer with scaled_dot_product_attention and LayerNorm (~8k
        parameters, 100 AdamW steps, batch 64), 32 test inputs × 25 outputs;
  p97   the modular-addition Transformer (p = 97, d_model 128; 30 AdamW steps, batch 64),
        16 test inputs × 97 outputs;
  cnn   the small CNN with batch norm (examples/cifar2; 30 SGD steps, batch 64), 16 test
        inputs × 2 outputs.

Efficiency = (the run's floating-point work ÷ this machine's matmul rate, measured in the same
process) ÷ wall time. The work comes from shapes alone (explaind_kernel/workmodel.py, computed
here again so the "before" code, which has no work model, is measured alike). The phase
times come from result.extra["work"] (after only).

"before" runs this script with PYTHONPATH at a worktree of an older commit (`--before-tree`),
in a subprocess of the same run, on the same machine, one after the other; it records its own
trace with the same seeds (the trace format moved on since, so traces are not shared).

    python bench/bench_kernel_speed.py --threads 1 --repeats 2 \
        --before-tree /path/to/worktree-of-old-main          # writes bench/results/kernel_speed.json
    python bench/bench_kernel_speed.py --models sdpa --quick  # a fast look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path and not os.environ.get("BENCH_KEEP_PATH"):
    sys.path.insert(0, str(ROOT))

import explaind_trace  # noqa: E402
from explaind_kernel import compute_kernel  # noqa: E402


class SDPATransformer(nn.Module):
    """Tokens [B, t] → logits over the vocabulary at the last position (pre-LayerNorm block)."""

    def __init__(self, vocab: int = 25, t: int = 6, d: int = 32, heads: int = 4, mlp: int = 32):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) / d**0.5)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.ReLU(), nn.Linear(mlp, d))
        self.unembed = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        h = self.embed(x) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(z.transpose(1, 2).reshape(b, t, -1))
        h = h + self.mlp(self.ln2(h))
        return self.unembed(h[:, -1])


#: --reduced: what fits a shared 2-core CPU in minutes (steps, test inputs, configs per model)
REDUCED = {"p97": (6, 4, ("gauss:2",)), "cnn": (3, 16, ("gauss:2",))}


def _sdpa(quick: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 25, (2048, 6), generator=g)
    y = x.sum(1) % 25
    model = SDPATransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, SDPATransformer, opt, x, y, (20 if quick else 100), 64, x[:32]


def _p97(quick: bool):
    from examples.modular_addition.model import ModularAdditionTransformer, make_dataset

    tx, ty, vx, _ = make_dataset(97, 0.3, 0)
    model = ModularAdditionTransformer(97)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))

    def fresh():
        return ModularAdditionTransformer(97)

    return model, fresh, opt, tx, ty, (5 if quick else 30), 64, vx[: (4 if quick else 16)]


def _cnn(quick: bool):
    from examples.cifar2.model import SmallCNN, synthetic_cifar2

    x, y = synthetic_cifar2(1024, seed=0)
    model = SmallCNN(num_classes=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def fresh():
        return SmallCNN(num_classes=2, width=16)

    return model, fresh, opt, x, y, (5 if quick else 30), 64, x[-16:]


MODELS = {"sdpa": _sdpa, "p97": _p97, "cnn": _cnn}
CONFIGS = {"gauss:2": {}, "gauss:2+kinks": {"kink_splits": 64, "kink_probes": 8}}


def matmul_rate(threads: int) -> float:
    """FLOP/s of a 1024² float32 matmul on `threads` threads (best of 5)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * 1024**3 / best


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return float(counter.get_total_flops())


def work(res, f: float, params: int, batch: int, probes: int | None) -> dict[str, float]:
    """The run's FLOPs per phase (explaind_kernel/workmodel.py's model, from the result)."""
    n, o = res.f0.shape
    t = res.num_steps
    evals = float(res.step_nodes.sum()) * n
    return {
        "test_jacobian": evals * o * 2 * f,
        "values": 2.0 * t * n * f,
        "kinks": float(t * (probes + 1) * n * f) if probes else 0.0,
        "training": 2.0 * t * batch * n * o * params + 3.0 * t * batch * f,
        "rule": 8.0 * t * n * o * params,
    }


def record_run(model, opt, x, y, *, steps: int, batch: int, store: str, generator=None) -> None:
    """Record `steps` cross-entropy steps on random batches of (x, y) into `store` (batches
    drawn from `generator`, by default one seeded with 1)."""
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    with explaind_trace.record(model, opt, store=store):
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def run_model(
    name: str, *, quick: bool, threads: int, repeats: int, workdir: str, reduced: bool
) -> dict:
    torch.manual_seed(0)
    model, fresh, opt, x, y, steps, batch, test_x = MODELS[name](quick)
    configs = list(CONFIGS)
    if reduced and name in REDUCED:
        steps, n, configs = REDUCED[name][0], REDUCED[name][1], list(REDUCED[name][2])
        test_x = test_x[:n]
    params = sum(p.numel() for p in model.parameters())
    store = os.path.join(workdir, f"{name}.trace")
    record_run(model, opt, x, y, steps=steps, batch=batch, store=store)
    f = forward_flops(fresh_copy(fresh, model), test_x[:1])
    out: dict = {"params": params, "steps": steps, "batch": batch, "test_inputs": len(test_x)}
    for cname in configs:
        kw = CONFIGS[cname]
        walls, res = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = compute_kernel(store, fresh(), test_x, progress=False, cpu_threads=threads, **kw)
            walls.append(time.perf_counter() - t0)
        w = work(res, f, params, batch, kw.get("kink_probes"))
        entry = {
            "wall_s": walls,
            "wall_min_s": min(walls),
            "flops": w,
            "flops_total": sum(w.values()),
            "completeness_rel": float(res.completeness()[1]),
            "jacobian_evaluations_per_input_step": float(res.step_nodes.mean()),
        }
        extra = getattr(res, "extra", {}) or {}
        if "work" in extra:
            entry["phase_seconds"] = extra["work"]["seconds"]
            entry["training_routes"] = extra.get("training_routes")
        out[cname] = entry
        print(f"{name} {cname}: {min(walls):.2f} s ({entry['completeness_rel']:.1e})", flush=True)
    return out


def fresh_copy(make, trained: nn.Module) -> nn.Module:
    m = make()
    m.load_state_dict(trained.state_dict())
    return m


def efficiency(entry: dict, rate: float) -> dict:
    wall = entry["wall_min_s"]
    out = {"overall": entry["flops_total"] / rate / wall}
    for phase, secs in (entry.get("phase_seconds") or {}).items():
        if phase in entry["flops"] and secs > 0:
            out[phase] = entry["flops"][phase] / rate / secs
    return out


def measure(models: list[str], *, quick: bool, threads: int, repeats: int, reduced: bool) -> dict:
    torch.set_num_threads(threads)
    rate = matmul_rate(threads)
    out = {"matmul_flops_per_s": rate, "threads": threads, "models": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            entry = run_model(
                name,
                quick=quick,
                threads=threads,
                repeats=repeats,
                workdir=workdir,
                reduced=reduced,
            )
            for cname in CONFIGS:
                if cname in entry:
                    entry[cname]["efficiency"] = efficiency(entry[cname], rate)
            out["models"][name] = entry
    return out


def _scaling_run(d: int, batch: int, inputs: int, steps: int, threads: int) -> dict:
    """One small SDPA run: wall time per (explained row × step), and this process's peak RSS."""
    import resource

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 25, (4096, 6), generator=g)
    y = x.sum(1) % 25
    model = SDPATransformer(d=d, mlp=d)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "s.trace")
        record_run(model, opt, x, y, steps=steps, batch=batch, store=store, generator=g)
        t0 = time.perf_counter()
        res = compute_kernel(
            store, SDPATransformer(d=d, mlp=d), x[:inputs], progress=False, cpu_threads=threads
        )
        wall = time.perf_counter() - t0
    rows = inputs * res.f0.shape[1]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "rows": rows,
        "steps": steps,
        "wall_s": wall,
        "us_per_row_step": 1e6 * wall / (rows * steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def scaling(threads: int) -> dict:
    """Time per (row × step) against parameters, batch and rows (gauss:2, 20 steps), and peak
    memory against the training-set size (steps × batch), each point in its own process."""
    grid = [(32, 64, 8), (16, 64, 8), (64, 64, 8), (32, 32, 8), (32, 128, 8), (32, 64, 16)]
    memory = [(32, 64, 8, 20), (32, 64, 8, 80)]
    points = [(d, b, n, 20) for d, b, n in grid] + memory
    out = []
    for d, b, n, steps in points:
        code = (
            f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "import bench.bench_kernel_speed as k; "
            f"print('JSON:' + json.dumps(k._scaling_run({d}, {b}, {n}, {steps}, {threads})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = [s for s in proc.stdout.splitlines() if s.startswith("JSON:")]
        out.append(json.loads(line[-1][5:]) if line else {"error": proc.stderr[-500:]})
        print("scaling", out[-1], flush=True)
    return {"points": out}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sdpa,p97,cnn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reduced", action="store_true", help="p97 and cnn at REDUCED sizes")
    ap.add_argument("--before-repeats", type=int, default=1)
    ap.add_argument("--scaling", action="store_true", help="also the scaling table")
    ap.add_argument("--before-tree", default=None, help="a worktree of the older commit")
    ap.add_argument("--json-only", action="store_true", help="print the JSON (subprocess use)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernel_speed.json"))
    args = ap.parse_args(argv)
    models = args.models.split(",")
    after = measure(
        models, quick=args.quick, threads=args.threads, repeats=args.repeats, reduced=args.reduced
    )
    if args.json_only:
        print("JSON:" + json.dumps(after))
        return
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "note": "min over repeats; before runs after after, in a subprocess of this run",
        "load_average_before": list(os.getloadavg()),
        "command": " ".join(  # the before tree by name only: no path outside the repository
            ["python", "bench/bench_kernel_speed.py"]
            + ["<before tree>" if a == args.before_tree else a for a in sys.argv[1:]]
        ),
        "reduced": REDUCED if args.reduced else None,
        "after": after,
    }
    if args.before_tree:
        env = dict(os.environ, PYTHONPATH=args.before_tree, BENCH_KEEP_PATH="1")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--json-only",
            "--models",
            args.models,
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.before_repeats),
        ]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--reduced"] if args.reduced else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.before_tree)
        line = [s for s in proc.stdout.splitlines() if s.startswith("JSON:")]
        result["before"] = json.loads(line[-1][5:]) if line else {"error": proc.stderr[-2000:]}
        result["before_tree_commit"] = subprocess.run(
            ["git", "-C", args.before_tree, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        speedup = {}
        for name in models:
            b = result["before"].get("models", {}).get(name, {})
            a = after["models"][name]
            speedup[name] = {
                c: b[c]["wall_min_s"] / a[c]["wall_min_s"] for c in CONFIGS if c in b and c in a
            }
        result["speedup"] = speedup
    if args.scaling:
        result["scaling"] = scaling(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("speedup",) if k in result}, indent=1))
    for name, entry in after["models"].items():
        for cname in CONFIGS:
            if cname not in entry:
                continue
            e = entry[cname]
            print(
                f"{name:5s} {cname:14s} wall {e['wall_min_s']:8.2f} s  "
                f"efficiency {e['efficiency']['overall']:.3f}  {e['efficiency']}"
            )


if __name__ == "__main__":
    main()
