"""Recording overhead and trace size: training wall time with vs without ``record()``.

Same process, alternating plain and recorded runs of the same seeded training, median
ratio over the pairs. Besides wall time it reports CPU time (whole process, and the
training thread alone, which includes the hooks), and the background writer's CPU per
step: on a shared machine wall time swings with other load, CPU time much less. Sizes: bytes the trace stores per step against the raw fp32 size
of what it captures (4 bytes x parameters for the gradient + the input batch bytes).

    python bench/bench_record.py                 # both models, 300 steps, 3 alternations
    python bench/bench_record.py --steps 50 --repeats 1 --models cnn
    python bench/bench_record.py --record-option cotangent_codec=auto   # any RecordOptions field
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explaind_trace as et  # noqa: E402
from examples.cifar2.model import SmallCNN, synthetic_cifar2  # noqa: E402
from examples.modular_addition.model import ModularAdditionTransformer, make_dataset  # noqa: E402
from explaind_trace.info import describe  # noqa: E402


def transformer_setup(seed: int):
    torch.manual_seed(seed)
    p = 97
    x, y, _, _ = make_dataset(p, train_fraction=0.3, seed=0)
    model = ModularAdditionTransformer(p, d_model=128, n_heads=4, d_mlp=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    return model, opt, x, y, 512


def cnn_setup(seed: int):
    torch.manual_seed(seed)
    x, y = synthetic_cifar2(2048, seed=0)
    model = SmallCNN(num_classes=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, x, y, 64


def sdpa_setup(seed: int):
    """Issue #12's small model: ~8k parameters, one layer, attention through
    F.scaled_dot_product_attention, AdamW, batch 64 (per-step fixed cost dominates)."""
    from bench.bench_kernel_speed import SDPATransformer

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 25, (2048, 6), generator=g)
    y = x.sum(1) % 25
    torch.manual_seed(seed)
    model = SDPATransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, opt, x, y, 64


SETUPS = {"transformer": transformer_setup, "cnn": cnn_setup, "sdpa": sdpa_setup}


def train(model, opt, x, y, batch: int, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


#: extra RecordOptions fields for the recorded runs (--record-option KEY=VALUE)
RECORD_OPTIONS: dict[str, object] = {}


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def run(name: str, *, steps: int, recorded: bool, checkpoint_every: int, workdir: str, tag: str):
    model, opt, x, y, batch = SETUPS[name](seed=0)
    path = os.path.join(workdir, f"{name}-{tag}.lmdb")
    cpu0, main0 = time.process_time(), time.thread_time()
    start = time.perf_counter()
    if recorded:
        with et.record(model, opt, store=path, checkpoint_every=checkpoint_every, **RECORD_OPTIONS):
            train(model, opt, x, y, batch, steps)
    else:
        train(model, opt, x, y, batch, steps)
    elapsed = time.perf_counter() - start  # includes draining the writer and closing the trace
    cpu = time.process_time() - cpu0  # all threads of this process (training, writer)
    main = time.thread_time() - main0  # the training thread alone (includes the hooks)
    info = None
    if recorded:
        info = describe(path, check_drift=False)
    params = sum(p.numel() for p in model.parameters())
    batch_bytes = x[:batch].numel() * x.element_size()
    return elapsed, (cpu, main), info, params, batch_bytes


def bench(name: str, *, steps: int, repeats: int, checkpoint_every: int) -> dict:
    plain, recorded, ratios, cpu_plain, cpu_recorded, cpu_ratios = [], [], [], [], [], []
    main_ratios, background = [], []
    info = None
    opts = {"steps": steps, "checkpoint_every": checkpoint_every}
    with tempfile.TemporaryDirectory() as workdir:
        warm = {**opts, "steps": min(steps, 20)}
        run(name, recorded=False, workdir=workdir, tag="warm-p", **warm)
        run(name, recorded=True, workdir=workdir, tag="warm-r", **warm)
        for r in range(repeats):
            t0, c0, _, params, batch_bytes = run(
                name, recorded=False, workdir=workdir, tag=f"p{r}", **opts
            )
            t1, c1, info, _, _ = run(name, recorded=True, workdir=workdir, tag=f"r{r}", **opts)
            plain.append(t0)
            recorded.append(t1)
            ratios.append(t1 / t0)
            cpu_plain.append(c0[0])
            cpu_recorded.append(c1[0])
            cpu_ratios.append(c1[0] / c0[0])
            main_ratios.append(c1[1] / c0[1])
            background.append((c1[0] - c1[1] - (c0[0] - c0[1])) / steps)
            print(
                f"{name}: plain {t0:.2f}s  recorded {t1:.2f}s  ratio {t1 / t0:.3f}  "
                f"(process cpu ratio {c1[0] / c0[0]:.3f}, training-thread cpu ratio "
                f"{c1[1] / c0[1]:.3f})",
                flush=True,
            )
    if info is None:
        raise RuntimeError("no recorded run")
    raw_per_step = 4 * params + batch_bytes
    stored_per_step = info["stored_bytes"] / steps
    return {
        "steps": steps,
        "repeats": repeats,
        "checkpoint_every": checkpoint_every,
        "parameters": params,
        "plain_seconds": plain,
        "recorded_seconds": recorded,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "plain_cpu_seconds": cpu_plain,
        "recorded_cpu_seconds": cpu_recorded,
        "cpu_ratios": cpu_ratios,
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "training_thread_cpu_ratios": main_ratios,
        "median_training_thread_cpu_ratio": statistics.median(main_ratios),
        "writer_cpu_ms_per_step": 1000 * statistics.median(background),
        "plain_ms_per_step": 1000 * statistics.median(plain) / steps,
        "recorded_ms_per_step": 1000 * statistics.median(recorded) / steps,
        "raw_fp32_bytes_per_step": raw_per_step,
        "stored_bytes_per_step": stored_per_step,
        "stored_bytes_per_step_by_kind": info.get("bytes_per_step"),
        "disk_bytes_per_step": (info["bytes_on_disk"] or 0) / steps,
        "compression_ratio": raw_per_step / stored_per_step,
        "trace_compression_ratio": info["compression_ratio"],
        "note": "stored bytes include checkpoints, first-time samples, RNG states and cotangents",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "record.json"))
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    ap.add_argument(
        "--record-option",
        type=_option,
        action="append",
        default=[],
        help="a RecordOptions field for the recorded runs, KEY=VALUE (repeatable)",
    )
    args = ap.parse_args(argv)
    RECORD_OPTIONS.update(dict(args.record_option))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {
        "benchmark": "record overhead",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_before": os.getloadavg(),
        "python": platform.python_version(),
        "record_options": dict(RECORD_OPTIONS),
        "models": {},
    }
    for name in args.models:
        results["models"][name] = bench(
            name, steps=args.steps, repeats=args.repeats, checkpoint_every=args.checkpoint_every
        )
    results["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    keys = (
        "median_ratio",
        "median_cpu_ratio",
        "median_training_thread_cpu_ratio",
        "writer_cpu_ms_per_step",
        "plain_ms_per_step",
        "recorded_ms_per_step",
        "compression_ratio",
    )
    summary = {k: {kk: v[kk] for kk in keys} for k, v in results["models"].items()}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
