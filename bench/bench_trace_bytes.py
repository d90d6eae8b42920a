"""Trace bytes per step, stored vs recomputed gradients; recording and kernel time per mode.

The same seeded training of the bench's p = 97 modular-addition Transformer (d_model 128,
AdamW, batch 512, as bench_record.py) is recorded with

- ``gradients="stored"`` (the default), generic cotangent codec;
- ``gradients="recompute"``, generic cotangent codec;
- ``gradients="recompute"``, ``cotangent_codec="auto"`` (the cross-entropy codec);
- ``gradients="auto"`` with that codec (one extra forward and backward per checkpoint);

and the stored bytes per step (progress ``stored_bytes`` / steps: checkpoints every 100 steps,
first-time samples, RNG states, cotangents, fingerprints, record structure) are set against
the raw fp32 gradient (4 bytes × parameters), with the bytes by kind.

Recording time: per mode, a plain and a recorded twin of the training side by side in one
process, alternating in blocks of steps (``bench/interleave.py``), the modes' order rotated
per repeat; the median of the recorded / plain ratios over the repeats. Kernel time: ``compute_kernel`` on a stored and a
recompute trace of a smaller run (batch 64, few steps, 2 test inputs), alternated; the
recompute trace's replay runs every forward once more, with a backward. The results of the
two are checked bitwise equal. On a shared machine the wall times are indicative only; the
ratios of alternated runs are the robust figure.

    python bench/bench_trace_bytes.py                          # defaults below
    python bench/bench_trace_bytes.py --steps 200 --repeats 2 --kernel-steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
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
sys.path.insert(0, str(ROOT))

import explaind_trace as et  # noqa: E402
from bench.bench_record import train  # noqa: E402  (the same seeded batches)
from bench.interleave import interleaved_overhead  # noqa: E402
from examples.modular_addition.model import ModularAdditionTransformer, make_dataset  # noqa: E402
from explaind_kernel import compute_kernel  # noqa: E402
from explaind_trace.stores.memory import MemoryStore  # noqa: E402

P = 97
MODES = {
    "stored": {"gradients": "stored"},
    "recompute": {"gradients": "recompute"},
    "recompute+codec": {"gradients": "recompute", "cotangent_codec": "auto"},
    "auto+codec": {"gradients": "auto", "cotangent_codec": "auto"},
}


def setup(seed: int = 0):
    torch.manual_seed(seed)
    x, y, _, _ = make_dataset(P, train_fraction=0.3, seed=0)
    model = ModularAdditionTransformer(P, d_model=128, n_heads=4, d_mlp=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    return model, opt, x, y


_names = iter(range(10**9))


def run(mode: str | None, *, steps: int, batch: int, every: int) -> tuple[float, dict, str]:
    """Seconds of one training run (recorded in `mode`, or plain), its progress, its store."""
    model, opt, x, y = setup()
    store = f"memory://bench-bytes-{next(_names)}"
    t0 = time.perf_counter()
    if mode is None:
        train(model, opt, x, y, batch=batch, steps=steps)
        return time.perf_counter() - t0, {}, store
    with et.record(model, opt, store=store, checkpoint_every=every, **MODES[mode]):
        train(model, opt, x, y, batch=batch, steps=steps)
    seconds = time.perf_counter() - t0
    with et.open_trace(store) as trace:
        progress = dict(trace.progress)
    return seconds, progress, store


def bytes_per_step(args) -> dict:
    model, _, _, _ = setup()
    params = sum(p.numel() for p in model.parameters())
    raw = 4 * params
    out: dict = {"parameters": params, "raw_fp32_gradient_bytes": raw, "modes": {}}
    for mode in MODES:
        _, prog, _ = run(mode, steps=args.steps, batch=args.batch, every=args.checkpoint_every)
        per = prog["stored_bytes"] / args.steps
        kinds = {k: v / args.steps for k, v in (prog.get("kind_bytes") or {}).items()}
        out["modes"][mode] = {
            "stored_bytes_per_step": per,
            "vs_raw_gradient": per / raw,
            "kind_bytes_per_step": kinds,
        }
        print(f"{mode}: {per / 1e3:.1f} KB/step = {per / raw:.4f} x raw gradient", flush=True)
    return out


def recording_time(args) -> dict:
    """Recorded / plain wall time per mode, each from a plain and a recorded twin trained
    side by side in blocks (``bench/interleave.py``: drift slower than a block falls on both);
    the modes' order rotates from repeat to repeat; median over the repeats."""
    modes = list(MODES)
    runs: dict[str, list[dict]] = {m: [] for m in modes}

    def make():
        model, opt, x, y = setup()
        return model, opt, x, y, args.batch

    kw = {"steps": args.time_steps, "block": args.block}
    opts = {"checkpoint_every": args.checkpoint_every}
    warm = f"memory://bench-bytes-{next(_names)}"
    interleaved_overhead(make, store=warm, steps=10, block=5)
    MemoryStore.drop(warm.removeprefix("memory://"))
    for r in range(args.repeats):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            store = f"memory://bench-bytes-{next(_names)}"
            one = interleaved_overhead(
                make, store=store, record_kwargs={**opts, **MODES[mode]}, **kw
            )
            MemoryStore.drop(store.removeprefix("memory://"))  # the timed runs keep no trace
            runs[mode].append(one)
            print(f"{mode}: recorded / plain {one['ratio']:.3f}", flush=True)
    ratios = {m: statistics.median(o["ratio"] for o in runs[m]) for m in modes}
    print(f"recording / plain (median of {args.repeats}): {ratios}", flush=True)
    plain = [o["plain_seconds"] for m in modes for o in runs[m]]
    return {
        "steps": args.time_steps,
        "block": args.block,
        "method": "a plain and a recorded twin side by side in blocks of steps, the recorder "
        "flushed inside its time at each block's end (bench/interleave.py); modes rotated",
        "runs": runs,
        "ratios": {m: [o["ratio"] for o in runs[m]] for m in modes},
        "plain_ms_per_step": 1000 * statistics.median(plain) / args.time_steps,
        "median_ratio_to_plain": ratios,
        "median_training_thread_cpu_ratio": {
            m: statistics.median(o["training_thread_cpu_ratio"] for o in runs[m]) for m in modes
        },
        "median_writer_cpu_ms_per_step": {
            m: statistics.median(o["writer_cpu_ms_per_step"] for o in runs[m]) for m in modes
        },
    }


def kernel_time(args) -> dict:
    stores = {}
    for mode in ("stored", "recompute"):
        stores[mode] = run(mode, steps=args.kernel_steps, batch=64, every=args.kernel_every)[2]
    _, _, x, _ = setup()
    test_x = x[:2]
    seconds: dict[str, list[float]] = {"stored": [], "recompute": []}
    results = {}
    for _ in range(args.repeats):
        for mode, store in stores.items():
            fresh = ModularAdditionTransformer(P, d_model=128, n_heads=4, d_mlp=512)
            t0 = time.perf_counter()
            results[mode] = compute_kernel(
                store, fresh, test_x, progress=False, training_mode="rules"
            )
            seconds[mode].append(time.perf_counter() - t0)
    a, b = results["stored"], results["recompute"]
    equal = all(
        np.array_equal(getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(a)
        if isinstance(getattr(a, f.name), np.ndarray)
    )
    ratio = statistics.median(r / s for r, s in zip(seconds["recompute"], seconds["stored"]))
    print(f"kernel recompute / stored (median of {args.repeats}): {ratio:.3f}", flush=True)
    return {
        "steps": args.kernel_steps,
        "batch": 64,
        "test_inputs": 2,
        "checkpoint_every": args.kernel_every,
        "seconds": seconds,
        "median_ratio_recompute_to_stored": ratio,
        "results_bitwise_equal": equal,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="steps of the bytes runs")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--time-steps", type=int, default=200, help="steps of the timed runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=20, help="steps per block of the timed twins")
    ap.add_argument("--kernel-steps", type=int, default=12)
    ap.add_argument("--kernel-every", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="bytes,recording,kernel", help="which measurements")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trace_bytes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "trace bytes per step and time: stored vs recomputed gradients",
        "command": " ".join(["bench/bench_trace_bytes.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "model": f"ModularAdditionTransformer(p={P}, d_model=128, n_heads=4, d_mlp=512), AdamW",
        "note": "wall times drift with the machine; the recording ratios are of twins trained "
        "side by side in blocks, the kernel ratio of alternated runs",
        "load_average_at_start": list(os.getloadavg()),
    }
    parts = {"bytes": bytes_per_step, "recording": recording_time, "kernel": kernel_time}
    for name in args.parts.split(","):
        if name not in parts:
            ap.error(f"--parts: {name!r} is not one of {', '.join(parts)}")
        results[name] = parts[name](args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
