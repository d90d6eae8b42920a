"""Checksum cost: recording with per-record checksums on vs off, and `explaind info --verify`.

One process, the same seeded training three ways per repeat (plain, recorded with
checksums, recorded without), interleaved so machine load hits all three alike (the order
reversed on every other repeat); medians over the repeats. Reports wall and CPU ratios against plain training, the writer thread's
CPU per step, stored bytes per step for both recordings, the throughput of
``verify_trace`` (what `explaind info --verify` runs: read, checksum and decode every
record) in MB/s of stored bytes, and the raw hashing speed of the candidate checksums.

``--verify-mb N`` also records a transformer trace of at least N MB (with and without
checksums) and times ``verify_trace`` on it: MB/s of stored bytes over every record, the
trace read from the page cache (it was just written), so decoding, not the disk, is timed.

    python bench/bench_checksum.py                      # every bench_record model, 200 steps, 5 repeats
    python bench/bench_checksum.py --steps 50 --repeats 1 --models cnn
    python bench/bench_checksum.py --models sdpa --verify-mb 300
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explaind_trace as et  # noqa: E402
from bench.bench_record import SETUPS, train  # noqa: E402
from explaind_trace.info import describe, verify_trace  # noqa: E402

VARIANTS = ("plain", "checksums", "no-checksums")


def run(name: str, variant: str, *, steps: int, checkpoint_every: int, path: str) -> dict:
    model, opt, x, y, batch = SETUPS[name](seed=0)
    cpu0, main0, start = time.process_time(), time.thread_time(), time.perf_counter()
    if variant == "plain":
        train(model, opt, x, y, batch, steps)
    else:
        with et.record(
            model, opt, store=path, checkpoint_every=checkpoint_every,
            checksums=variant == "checksums",
        ):  # fmt: skip
            train(model, opt, x, y, batch, steps)
    out = {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu0,
        "writer_cpu": (time.process_time() - cpu0) - (time.thread_time() - main0),
    }
    if variant != "plain":
        info = describe(path, check_drift=False)
        out["stored_bytes_per_step"] = info["stored_bytes"] / steps
        out["disk_bytes_per_step"] = (info["bytes_on_disk"] or 0) / steps
    return out


def bench(name: str, *, steps: int, repeats: int, checkpoint_every: int) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    verify: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:  # warm-up
            run(name, v, steps=10, checkpoint_every=checkpoint_every, path=f"{tmp}/w-{v}.lmdb")
        for r in range(repeats):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                path = f"{tmp}/{r}-{v}.lmdb"
                runs[v].append(
                    run(name, v, steps=steps, checkpoint_every=checkpoint_every, path=path)
                )
            for v in ("checksums", "no-checksums"):
                rep = verify_trace(f"{tmp}/{r}-{v}.lmdb")
                assert rep.ok, rep.damaged
                verify.append({"variant": v, "bytes": rep.bytes, "seconds": rep.seconds,
                               "mb_per_s": rep.mb_per_s, "records": rep.records})  # fmt: skip
            line = "  ".join(f"{v} {runs[v][-1]['seconds']:.2f}s" for v in VARIANTS)
            print(f"{name} repeat {r}: {line}", flush=True)

    def med(v: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[v])

    out: dict = {"steps": steps, "repeats": repeats, "checkpoint_every": checkpoint_every}
    plain_s, plain_cpu = med("plain", "seconds"), med("plain", "cpu")
    for v in ("checksums", "no-checksums"):
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs[v], runs["plain"])]
        out[v] = {
            "median_wall_ratio": statistics.median(ratios),
            "wall_ratios": ratios,
            "median_cpu_ratio": med(v, "cpu") / plain_cpu,
            "writer_cpu_ms_per_step": 1000
            * (med(v, "writer_cpu") - med("plain", "writer_cpu"))
            / steps,
            "ms_per_step": 1000 * med(v, "seconds") / steps,
            "stored_bytes_per_step": med(v, "stored_bytes_per_step"),
            "disk_bytes_per_step": med(v, "disk_bytes_per_step"),
            "verify_mb_per_s": statistics.median(
                x["mb_per_s"] for x in verify if x["variant"] == v
            ),
        }
    out["plain_ms_per_step"] = 1000 * plain_s / steps
    out["checksum_wall_cost"] = (
        out["checksums"]["median_wall_ratio"] / out["no-checksums"]["median_wall_ratio"]
    )
    out["checksum_bytes_per_step"] = (
        out["checksums"]["stored_bytes_per_step"] - out["no-checksums"]["stored_bytes_per_step"]
    )
    out["verify_runs"] = verify
    return out


def verify_large(megabytes: float, *, checkpoint_every: int) -> dict:
    """Record a transformer trace of at least ``megabytes`` MB with and without checksums
    (steps from a 10-step probe of the bytes per step), then time ``verify_trace`` on each."""
    out: dict = {"model": "transformer", "target_mb": megabytes}
    with tempfile.TemporaryDirectory() as tmp:
        probe = run("transformer", "checksums", steps=10, checkpoint_every=checkpoint_every,
                    path=f"{tmp}/probe.lmdb")  # fmt: skip
        steps = int(megabytes * 1e6 / probe["stored_bytes_per_step"]) + 1
        out["steps"] = steps
        for v in ("checksums", "no-checksums"):
            path = f"{tmp}/large-{v}.lmdb"
            rec = run("transformer", v, steps=steps, checkpoint_every=checkpoint_every, path=path)
            runs = []
            for _ in range(2):  # the first read also warms the page cache
                rep = verify_trace(path)
                assert rep.ok, rep.damaged
                runs.append({"seconds": rep.seconds, "mb_per_s": rep.mb_per_s})
            out[v] = {
                "stored_mb": rep.bytes / 1e6,
                "records": rep.records,
                "record_seconds": rec["seconds"],
                "verify_runs": runs,
                "verify_mb_per_s": max(r["mb_per_s"] for r in runs),
            }
            print(f"verify {v}: {rep.bytes / 1e6:.0f} MB, {runs}", flush=True)
    return out


def hashing() -> dict:
    """GB/s of each candidate checksum over 50 KB and 8 MiB of random bytes."""
    algos = {
        "blake2b-64": lambda b: hashlib.blake2b(b, digest_size=8).digest(),
        "crc32": zlib.crc32,
    }
    try:
        import xxhash

        algos = {"xxh3-64": xxhash.xxh3_64_intdigest, "xxh64": xxhash.xxh64_intdigest, **algos}
    except ImportError:
        pass
    out: dict = {}
    for size in (50_000, 8 << 20):
        data = os.urandom(size)
        reps = max(5, (128 << 20) // size)
        for name, fn in algos.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(data)
            out.setdefault(name, {})[str(size)] = size * reps / (time.perf_counter() - t0) / 1e9
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "checksum.json"))
    ap.add_argument("--note", default="", help="say how loaded the machine was")
    ap.add_argument("--verify-mb", type=float, default=0, help="also verify a trace this large")
    args = ap.parse_args(argv)
    results = {
        "benchmark": "checksum cost (recording, bytes per step, verify throughput)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "note": args.note,
        "load_average_before": os.getloadavg(),
        "hashing_gb_per_s": hashing(),
        "models": {},
    }
    for name in args.models:
        results["models"][name] = bench(
            name, steps=args.steps, repeats=args.repeats, checkpoint_every=args.checkpoint_every
        )
    if args.verify_mb > 0:
        results["verify_large"] = verify_large(
            args.verify_mb, checkpoint_every=args.checkpoint_every
        )
    results["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    summary = {
        k: {
            "checksum_wall_cost": v["checksum_wall_cost"],
            "checksum_bytes_per_step": v["checksum_bytes_per_step"],
            **{
                f"{vv}_{kk}": v[vv][kk]
                for vv in ("checksums", "no-checksums")
                for kk in (
                    "median_wall_ratio",
                    "median_cpu_ratio",
                    "stored_bytes_per_step",
                    "verify_mb_per_s",
                )
            },
        }  # fmt: skip
        for k, v in results["models"].items()
    }
    print(json.dumps({"hashing_gb_per_s": results["hashing_gb_per_s"], **summary}, indent=2))


if __name__ == "__main__":
    main()
