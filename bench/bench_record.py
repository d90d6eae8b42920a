"""Recording overhead and trace size: training wall time with vs without ``record()``.

A plain and a recorded twin of the same seeded training, side by side in one process,
alternating in blocks of steps (``bench/interleave.py``: the VM's drift falls on both), the
median ratio over the repeats. Besides wall time it reports CPU time (whole process, and
the training thread alone, which includes the hooks), and the background writer's CPU per
step. Sizes: bytes the trace stores per step against the raw fp32 size
of what it captures (4 bytes x parameters for the gradient + the input batch bytes).

    python bench/bench_record.py                 # all models, 300 steps, 3 repeats
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.interleave import interleaved_overhead, train_steps  # noqa: E402
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
    """``steps`` seeded steps (the batches drawn from a generator seeded 1)."""
    train_steps(model, opt, x, y, batch, torch.Generator().manual_seed(1), steps)


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


def bench(name: str, *, steps: int, repeats: int, checkpoint_every: int, block: int) -> dict:
    """``repeats`` side-by-side measurements (``bench/interleave.py``) of ``name``'s training,
    plain and recorded to an LMDB trace; the last trace's sizes."""
    runs = []
    info = None

    def make():
        return SETUPS[name](seed=0)

    opts = {"checkpoint_every": checkpoint_every, **RECORD_OPTIONS}
    with tempfile.TemporaryDirectory() as workdir:
        warm = os.path.join(workdir, f"{name}-warm.lmdb")
        interleaved_overhead(make, store=warm, steps=min(steps, 20), block=10, record_kwargs=opts)
        for r in range(repeats):
            path = os.path.join(workdir, f"{name}-{r}.lmdb")
            one = interleaved_overhead(
                make, store=path, steps=steps, block=block, record_kwargs=opts
            )
            runs.append(one)
            info = describe(path, check_drift=False)
            print(
                f"{name}: plain {one['plain_seconds']:.2f}s  recorded {one['recorded_seconds']:.2f}s"
                f"  ratio {one['ratio']:.3f}  (process cpu ratio {one['cpu_ratio']:.3f}, "
                f"training-thread cpu ratio {one['training_thread_cpu_ratio']:.3f})",
                flush=True,
            )
    if info is None:
        raise RuntimeError("no recorded run")
    model, _, x, _, batch = make()
    params = sum(p.numel() for p in model.parameters())
    raw_per_step = 4 * params + x[:batch].numel() * x.element_size()
    stored_per_step = info["stored_bytes"] / steps

    def med(key: str) -> float:
        return statistics.median(o[key] for o in runs)

    return {
        "steps": steps,
        "repeats": repeats,
        "block": block,
        "checkpoint_every": checkpoint_every,
        "parameters": params,
        "runs": runs,
        "ratios": [o["ratio"] for o in runs],
        "median_ratio": med("ratio"),
        "median_cpu_ratio": med("cpu_ratio"),
        "median_training_thread_cpu_ratio": med("training_thread_cpu_ratio"),
        "writer_cpu_ms_per_step": med("writer_cpu_ms_per_step"),
        "plain_ms_per_step": 1000 * med("plain_seconds") / steps,
        "recorded_ms_per_step": 1000 * med("recorded_seconds") / steps,
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
    ap.add_argument("--block", type=int, default=20, help="steps per block of the twins")
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
            name,
            steps=args.steps,
            repeats=args.repeats,
            checkpoint_every=args.checkpoint_every,
            block=args.block,
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
