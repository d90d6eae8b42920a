"""The command line's shared options: the model/inputs/target flags of every kernel verb,
the kernel flags, and their translation into compute_kernel keyword arguments."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError

__all__ = ["add_kernel_options", "add_model_options", "kernel_kwargs", "keep_options"]

_KEEP_FIELDS = ("sample_component", "sample_window", "component_window", "param_scores")


def keep_options(spec: str | None) -> Any:
    """KeepOptions from --keep: comma-separated field names, "all" or "none"."""
    from explaind_kernel import KeepOptions

    if spec is None:
        return KeepOptions()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return KeepOptions(**{f: True for f in _KEEP_FIELDS})
    if names == ["none"]:
        return KeepOptions(**{f: False for f in _KEEP_FIELDS})
    unknown = [n for n in names if n not in _KEEP_FIELDS]
    if unknown:
        raise UsageError(
            f"--keep {spec!r}: unknown slice(s) {unknown}; use a comma-separated list of "
            f"{', '.join(_KEEP_FIELDS)}, or all, or none"
        )
    return KeepOptions(**{f: f in names for f in _KEEP_FIELDS})


def kernel_kwargs(args: argparse.Namespace, labels: Any) -> dict[str, Any]:
    if args.nodes < 1:
        raise UsageError(f"--nodes must be ≥ 1, got {args.nodes}")
    if args.kink_splits < 0:
        raise UsageError(f"--kink-splits must be ≥ 0, got {args.kink_splits}")
    threads = args.cpu_threads
    if threads != "auto":
        if not str(threads).isdigit() or int(threads) < 1:
            raise UsageError(f"--cpu-threads must be ≥ 1 or auto, got {threads}")
        threads = int(threads)
    kw: dict[str, Any] = {
        "outputs": args.outputs,
        "labels": labels,
        "quadrature": f"gauss:{args.nodes}",
        "kink_splits": args.kink_splits,
        "device": args.device,
        "dtype": args.dtype,
        "keep": keep_options(args.keep),
        "cpu_threads": threads,
    }
    if args.no_progress:
        kw["progress"] = False
    return kw


def add_model_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="MODULE:FACTORY",
        help="FACTORY() builds a model of the traced architecture",
    )
    p.add_argument(
        "--inputs",
        required=required,
        metavar="FILE.npy|FILE.npz|MODULE:FUNCTION",
        help="test inputs: a .npy array, an .npz with x (and y: labels), or FUNCTION() "
        "returning a tensor, an (inputs, labels) tuple or a Dataset yielding (x, y)",
    )
    p.add_argument(
        "--outputs",
        default="all",
        metavar="TARGET",
        help="what to explain: loss | margin | label | predicted | all, or any name "
        "registered with explaind_kernel.register_target (default: all)",
    )
    p.add_argument("--labels", metavar="FILE.npy", help="labels of the test inputs (one per row)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64"),
        help="compute dtype (float64 to verify; default: float32)",
    )
    p.add_argument(
        "--cpu-threads",
        default="auto",
        metavar="N|auto",
        help="torch intra-op threads while computing on CPU (default: auto, a short "
        "calibration that keeps 1 thread unless all are clearly faster)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_kernel_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    add_model_options(p, required=required)
    p.add_argument(
        "--nodes",
        type=int,
        default=2,
        metavar="N",
        help="Gauss-Legendre nodes per step (default: 2)",
    )
    p.add_argument(
        "--kink-splits",
        type=int,
        default=0,
        metavar="K",
        help="cut each step at up to K ReLU-type kinks per test input, so Gauss keeps its "
        "order on piecewise-smooth models (default: 0, off)",
    )
    p.add_argument(
        "--keep",
        default=None,
        metavar="SLICES",
        help="joint slices to keep: comma-separated sample_component, sample_window, "
        "component_window, param_scores, or all / none (default: component_window)",
    )
