"""Bytes per step of the language-model example's trace, and its recording overhead.

Trains examples/language_model (a tiny GPT-2 under the Hugging Face Trainer, ~109k parameters,
batch 16 × context 32 × vocabulary 106) once per recording mode — stored gradients or
recomputed ones, generic or loss-aware cotangent codec, whichever this version has — and
compares what the trace stores per step with the raw fp32 size of what the kernel needs from
a step: the gradient (4 × parameters) plus the logits cotangent (4 × batch × context ×
vocabulary). Bytes are deterministic (one run each); times come from runs alternated in one
process (plain, then each mode, `--repeats` times), median ratio over the rounds.

    python bench/bench_lm_bytes.py --kernel-repeats 2       # 200 steps, 3 rounds, both presets
    python bench/bench_lm_bytes.py --steps 20 --repeats 1 --presets example   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explaind_trace as et  # noqa: E402
from examples.language_model import train  # noqa: E402
from explaind_trace.options import COTANGENT_CODECS, GRADIENT_MODES  # noqa: E402
from explaind_trace.schema import ckpt_key  # noqa: E402

#: model/data sizes: the example as it ships, and one with a real LM's proportions (the
#: logits cotangent as large as the gradient: vocabulary 509, context 64, d_model 128)
PRESETS = {
    "example": {},
    "scaled": {"numbers": 500, "context": 64, "d_model": 128, "checkpoint_every": 100},
}

#: (name, gradients, cotangent_codec), in order of expected size
MODES = (
    ("stored", "stored", "generic"),
    ("stored+codec", "stored", "auto"),
    ("recompute", "recompute", "generic"),
    ("recompute+codec", "recompute", "auto"),
)


def available_modes(names: list[str] | None = None) -> list[tuple[str, str, str]]:
    """The modes this version of explaind_trace can record (those in ``names`` if given)."""
    return [
        m
        for m in MODES
        if m[1] in GRADIENT_MODES and m[2] in COTANGENT_CODECS and (not names or m[0] in names)
    ]


def size_argv(cfg: dict) -> list[str]:
    return [a for k, v in cfg.items() for a in ("--" + k.replace("_", "-"), str(v))]


def run(workdir: str, tag: str, steps: int, mode: tuple[str, str, str] | None, sizes: dict) -> dict:
    out = Path(workdir) / tag
    argv = ["--out", str(out), "--steps", str(steps), "--no-progress", "--overwrite"]
    argv += size_argv(sizes)
    if mode is None:
        argv.append("--no-record")
    else:
        argv += ["--gradients", mode[1], "--cotangent-codec", mode[2]]
    summary = train.main(argv)
    if mode is not None:
        with et.open_trace(str(out / "trace.lmdb")) as reader:
            prog = dict(reader.progress)
            summary["stored_bytes"] = int(prog.get("stored_bytes", 0))
            summary["kind_bytes"] = dict(prog.get("kind_bytes", {}))
            summary["bytes_on_disk"] = int(reader.store.nbytes() or 0)
            summary["checkpoints"] = list(reader.checkpoint_steps)
            # a checkpoint after step 0 holds θ and the optimizer state (Adam: both moments);
            # θ_0's moments are empty and the final record keeps only the state's digest
            later = [len(reader.store.get(ckpt_key(t))) for t in reader.checkpoint_steps if t]
            summary["full_checkpoint_bytes"] = max(later, default=None)
    return summary


def kernel_times(workdir: str, traces: dict[str, str], repeats: int, n: int) -> dict:
    """Kernel seconds per mode, alternated (analyze.py's kernel, --n-explain n)."""
    from examples.language_model import analyze

    times: dict[str, list[float]] = {m: [] for m in traces}
    for _ in range(repeats):
        for mode, run_dir in traces.items():
            s = analyze.main(
                ["--run", run_dir, "--out", f"{workdir}/an-{mode}", "--n-explain", str(n)]
                + ["--no-progress", "--training-mode", "rules", "--cpu-threads", "1"]
            )
            times[mode].append(s["kernel_seconds"])
    return times


def bench(
    preset: str,
    steps: int,
    repeats: int,
    kernel_repeats: int,
    workdir: str,
    *,
    modes: list[str] | None = None,
    checkpoint_every: int | None = None,
) -> dict:
    sizes = dict(PRESETS[preset])
    if checkpoint_every is not None:
        sizes["checkpoint_every"] = checkpoint_every
    cfg = {**train.FULL, **sizes, "steps": steps}
    modes = available_modes(modes)
    params = None
    bytes_by_mode: dict[str, dict] = {}
    dirs: dict[str, str] = {}
    seconds: dict[str, list[float]] = {"plain": [], **{m[0]: [] for m in modes}}
    warm = ["--out", f"{workdir}/warm-{preset}", "--steps", "5", "--no-progress"]
    train.main(warm + size_argv(sizes))
    for r in range(repeats):
        s = run(workdir, f"{preset}-plain{r}", steps, None, sizes)
        seconds["plain"].append(s["train_seconds"])
        params = s["parameters"]
        for mode in modes:
            s = run(workdir, f"{preset}-{mode[0]}{r}", steps, mode, sizes)
            seconds[mode[0]].append(s["train_seconds"])
            if mode[0] not in bytes_by_mode:
                bytes_by_mode[mode[0]] = s
                dirs[mode[0]] = f"{workdir}/{preset}-{mode[0]}{r}"  # kept for the kernel
            else:
                shutil.rmtree(f"{workdir}/{preset}-{mode[0]}{r}")  # bytes are read: free disk
            print(f"{preset} round {r} {mode[0]}: {s['train_seconds']:.2f} s", flush=True)
        print(f"{preset} round {r} plain: {seconds['plain'][-1]:.2f} s", flush=True)
    vocab = cfg["numbers"] + 3 + 6
    grad_raw = 4 * params
    cot_raw = 4 * cfg["batch_size"] * cfg["context"] * vocab
    raw = grad_raw + cot_raw
    res = {
        "config": cfg,
        "vocab_size": vocab,
        "parameters": params,
        "raw_fp32_gradient_bytes_per_step": grad_raw,
        "raw_fp32_logits_cotangent_bytes_per_step": cot_raw,
        "raw_bytes_per_step": raw,
        "plain_seconds": seconds["plain"],
        "modes": {},
    }
    plain = seconds["plain"]
    for name, _, _ in modes:
        s = bytes_by_mode[name]
        kinds = s["kind_bytes"]
        ckpt = kinds.get("checkpoints", 0)
        per_step = s["stored_bytes"] / steps
        no_ckpt = (s["stored_bytes"] - ckpt) / steps
        n_ckpt = len(s["checkpoints"]) + 1  # the stored checkpoints and the final state
        full = s["full_checkpoint_bytes"]  # None: the run had no checkpoint after θ_0
        ratios = [t / p for t, p in zip(seconds[name], plain)]
        res["modes"][name] = {
            "stored_bytes_per_step": per_step,
            "ratio_to_raw": per_step / raw,
            "per_step_records_bytes_per_step": no_ckpt,
            "per_step_records_ratio_to_raw": no_ckpt / raw,
            "checkpoint_bytes_each": ckpt / n_ckpt,
            "full_checkpoint_bytes": full,
            "steady_state_ratio_to_raw": None
            if full is None
            else {str(k): (no_ckpt + full / k) / raw for k in (50, 100, 200, 500, 1000)},
            "disk_bytes_per_step": s["bytes_on_disk"] / steps,
            "kind_bytes_per_step": {k: v / steps for k, v in kinds.items()},
            "seconds": seconds[name],
            "overhead_ratios": ratios,
            "median_overhead_ratio": statistics.median(ratios),
        }
    if kernel_repeats and preset == "example":
        pair = {m: dirs[m] for m in ("stored", "recompute+codec") if m in dirs}
        times = kernel_times(workdir, pair, kernel_repeats, n=2)
        res["kernel_seconds"] = times
        if len(pair) == 2:
            ratios = [a / b for a, b in zip(times["recompute+codec"], times["stored"])]
            res["kernel_recompute_codec_over_stored"] = ratios
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument(
        "--kernel-repeats",
        type=int,
        default=0,
        help="also time the kernel (2 held-out sentences) on the example's stored and "
        "recompute + codec traces, alternated, this many times",
    )
    ap.add_argument(
        "--modes", nargs="+", default=None, choices=[m[0] for m in MODES], help="default: all"
    )
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="checkpoint interval of every preset (default: the preset's, the example's own)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_bytes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {
        "benchmark": "language-model trace bytes per step and recording overhead",
        "command": " ".join(["bench/bench_lm_bytes.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "threads": 1,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "steps": args.steps,
        "repeats": args.repeats,
        "note": (
            "raw = fp32 gradient + fp32 logits cotangent per optimizer step. stored bytes: the "
            "trace's tensor payloads and record structure, checkpoints, θ_0, the final state "
            "and first-time samples included; per_step_records leaves the checkpoints out; "
            "steady_state_ratio_to_raw[K] = (per-step records + one full checkpoint / K) / "
            "raw, a long run checkpointed every K steps (full_checkpoint_bytes: the largest "
            "checkpoint after step 0, θ and the optimizer state; None, and no steady state, "
            "when the run has none). Times: Trainer.train() wall time incl. "
            "closing the trace, on a shared 2-core machine (other sessions running); the "
            "ratios of runs alternated in one process are the robust figure."
        ),
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for preset in args.presets:
            results["presets"][preset] = bench(
                preset,
                args.steps,
                args.repeats,
                args.kernel_repeats,
                workdir,
                modes=args.modes,
                checkpoint_every=args.checkpoint_every,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for preset, res in results["presets"].items():
        raw = res["raw_bytes_per_step"]
        for name, m in res["modes"].items():
            steady = m["steady_state_ratio_to_raw"]
            steady_100 = "n/a" if steady is None else f"{steady['100']:.4f}x"
            print(
                f"{preset:8s} {name:16s} {m['stored_bytes_per_step'] / 1e3:9.1f} KB/step = "
                f"{m['ratio_to_raw']:.4f}x raw ({raw / 1e3:.1f} KB); steady state K=100 "
                f"{steady_100}; overhead {m['median_overhead_ratio']:.3f}x"
            )
        if "kernel_recompute_codec_over_stored" in res:
            print(
                f"{preset} kernel recompute+codec / stored: {res['kernel_recompute_codec_over_stored']}"
            )


if __name__ == "__main__":
    main()
