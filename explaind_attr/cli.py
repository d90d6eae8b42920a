"""The `explaind` command line: info, kernel, quadrature, report, demo.

    explaind info TRACE [--verify]
    explaind kernel TRACE --model MODULE:FACTORY --inputs MODULE:FUNCTION|FILE.npy
    explaind quadrature TRACE --model ... --inputs ... [--rules gauss:1,gauss:2,gauss:1+kinks]
    explaind report TRACE [--result R] [--model ... --inputs ...] [--out DIR]
    explaind demo [--out DIR]

MODULE is imported from the current directory. Errors raised by ExPLAIND (explaind_trace,
explaind_kernel, explaind_attr: every `ExplaindError`) print one line on stderr and exit
with code 2; --debug shows the traceback instead. Errors raised by the user's own code are
not caught.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explaind_trace.errors import ExplaindError

from .errors import UsageError


def _loading():
    from explaind_kernel import loading

    return loading


log = logging.getLogger(__name__)

EXIT_LIBRARY_ERROR = 2


# ----------------------------------------------------------------- argument resolution


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, inputs, labels) from --model, --inputs and --labels."""
    if not args.model or not args.inputs:
        raise UsageError("computing a kernel result needs --model MODULE:FACTORY and --inputs")
    model = _loading().load_model(args.model)
    inputs, labels = _loading().load_inputs(args.inputs, args.labels)
    if args.outputs == "label" and labels is None:
        raise UsageError(
            "--outputs label needs labels: pass --labels FILE.npy, or return (inputs, labels) "
            "from the --inputs function"
        )
    return model, inputs, labels


def _compute(args: argparse.Namespace) -> Any:
    if args.nodes < 1:
        raise UsageError(f"--nodes must be ≥ 1, got {args.nodes}")
    if args.kink_splits < 0:
        raise UsageError(f"--kink-splits must be ≥ 0, got {args.kink_splits}")
    model, inputs, labels = _load(args)
    try:
        from explaind_kernel import compute_kernel
    except ImportError as e:
        raise UsageError(f"the kernel engine (explaind_kernel) cannot be imported: {e}") from e
    options: dict[str, Any] = {}
    if args.no_progress:
        options["progress"] = False
    return compute_kernel(
        args.trace,
        model,
        inputs,
        outputs=args.outputs,
        labels=labels,
        quadrature=f"gauss:{args.nodes}",
        kink_splits=args.kink_splits,
        device=args.device,
        **options,
    )


def _default_path(trace: str, suffix: str) -> Path:
    return Path(trace.split("://", 1)[-1].rstrip("/\\") + suffix)


def _trace_id(trace: str) -> str:
    from explaind_trace import open_trace

    from .results import trace_id_of

    with open_trace(trace) as reader:
        return trace_id_of(reader)


def _samples_from_trace(trace: str, ids: Sequence[str]) -> dict[str, Any]:
    """Input rows of `ids` read back from the trace, for the report's sample panels."""
    from explaind_trace import open_trace

    from .report import samples_from_trace

    with open_trace(trace) as reader:
        return samples_from_trace(reader, ids)


# ----------------------------------------------------------------------- subcommands


def _cmd_info(args: argparse.Namespace) -> int:
    try:
        from explaind_trace.info import describe, format_info
    except ImportError as e:
        raise UsageError(
            f"`explaind info` needs explaind_trace.info, which cannot be imported: {e}"
        ) from e
    if getattr(args, "verify", False):
        from explaind_trace.info import format_verify, verify_error, verify_trace

        report = verify_trace(args.path)
        print(format_verify(report))
        if not report.ok:
            raise verify_error(report)
    print(format_info(describe(args.path)))
    return 0


def _cmd_kernel(args: argparse.Namespace) -> int:
    result = _compute(args)
    out = Path(args.out) if args.out else _default_path(args.trace, ".result.explaind")
    result.save(out)
    log.info("kernel result saved to %s", out)
    print(result.completeness_line())
    return 0


def _cmd_quadrature(args: argparse.Namespace) -> int:
    from explaind_kernel import compare_quadrature

    model, inputs, labels = _load(args)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    results = compare_quadrature(
        args.trace,
        model,
        inputs,
        rules,
        outputs=args.outputs,
        labels=labels,
        device=args.device,
        kink_probes=args.kink_probes,
        progress=not args.no_progress,
    )
    print(f"{'rule':<22} {'evaluations/step':>16} {'max_abs':>10} {'rel':>10}")
    for r in results:
        print(
            f"{r.rule:<22} {r.evaluations_per_step:>16.2f} {r.max_abs:>10.3e} {r.rel_error:>10.3e}"
        )
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
        log.info("quadrature errors saved to %s", args.json)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from explaind_kernel.result import KernelResult

    from .errors import ResultMismatchError
    from .report import build_report
    from .results import check_result_matches

    out_dir = Path(args.out) if args.out else _default_path(args.trace, ".report")
    result: KernelResult | None = None
    save_to = out_dir / "result.explaind"
    if args.result and Path(args.result).exists():
        loaded = KernelResult.load(args.result)
        try:
            check_result_matches(loaded, _trace_id(args.trace))
            result = loaded
        except ResultMismatchError as e:
            print(f"explaind: note: {e}; computing a new one", file=sys.stderr)
    elif args.result:
        save_to = Path(args.result)
    if result is None:
        result = _compute(args)
        out_dir.mkdir(parents=True, exist_ok=True)
        result.save(save_to)
        log.info("kernel result saved to %s", save_to)
    samples = _samples_from_trace(args.trace, result.sample_ids)
    paths = build_report(result, out_dir, samples=samples, title=f"ExPLAIND report: {args.trace}")
    print(result.completeness_line())
    print(f"report: {paths.html}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    options = {"progress": False} if args.no_progress else {}
    summary = run_demo(args.out, quick=args.quick, **options)
    print(f"report: {summary.report}")
    print(
        f"trained {summary.steps} steps (train accuracy {summary.train_accuracy:.2f}, "
        f"test accuracy {summary.test_accuracy:.2f}) in {summary.seconds.get('total', 0.0):.0f} s"
    )
    print(summary.completeness_line)
    return 0


# --------------------------------------------------------------------------- parser


def _model_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="MODULE:FACTORY",
        help="FACTORY() builds a model of the traced architecture",
    )
    p.add_argument(
        "--inputs",
        required=required,
        metavar="MODULE:FUNCTION|FILE.npy",
        help="test inputs: FUNCTION() returns a tensor or (inputs, labels)",
    )
    p.add_argument(
        "--outputs",
        choices=("all", "predicted", "label"),
        default="all",
        help="which outputs to explain (default: all)",
    )
    p.add_argument("--labels", metavar="FILE.npy", help="labels for --outputs label")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _kernel_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    _model_options(p, required=required)
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


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `explaind` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks instead of one-line errors",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (-v info, -vv debug)",
    )
    parser = argparse.ArgumentParser(
        prog="explaind",
        parents=[common],
        description="Exact model, data and training attribution for recorded PyTorch runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", parents=[common], help="describe a recorded trace")
    p.add_argument("path", metavar="TRACE")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read back every record; list the damaged ones and the last intact step",
    )
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("kernel", parents=[common], help="compute and save a kernel result")
    p.add_argument("trace", metavar="TRACE")
    _kernel_options(p, required=True)
    p.add_argument("--out", metavar="RESULT", help="result file (default: TRACE.result.explaind)")
    p.set_defaults(func=_cmd_kernel)

    p = sub.add_parser(
        "quadrature",
        parents=[common],
        help="measure quadrature rules' errors on a trace (cheap: forward-mode JVPs)",
    )
    p.add_argument("trace", metavar="TRACE")
    _model_options(p, required=True)
    p.add_argument(
        "--rules",
        default="gauss:1,gauss:2,gauss:3,gauss:1+kinks,gauss:2+kinks",
        help="comma-separated RULE:NODES[+kinks[:LIMIT]] (default: Gauss 1-3, Gauss 1-2 with "
        "kink splits)",
    )
    p.add_argument(
        "--kink-probes", type=int, default=8, help="probe intervals that locate kinks (default: 8)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.set_defaults(func=_cmd_quadrature)

    p = sub.add_parser("report", parents=[common], help="write an HTML/markdown report")
    p.add_argument("trace", metavar="TRACE")
    _kernel_options(p, required=False)
    p.add_argument("--result", metavar="R", help="a saved result to use when it fits TRACE")
    p.add_argument("--out", metavar="DIR", help="report directory (default: TRACE.report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", parents=[common], help="run the end-to-end demo")
    p.add_argument("--out", metavar="DIR", default="explaind-demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for ExPLAIND errors)."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="explaind: %(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except Exception as e:
        if debug or not isinstance(e, ExplaindError):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"explaind: error: {message}", file=sys.stderr)
        return EXIT_LIBRARY_ERROR


if __name__ == "__main__":
    sys.exit(main())
