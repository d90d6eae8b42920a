"""The `explaind` command line — every verb in one module.

    explaind info TRACE [--verify]
    explaind kernel TRACE --model MODULE:FACTORY --inputs FILE.npy|FILE.npz|MODULE:FUNCTION
    explaind quadrature TRACE --model ... --inputs ... [--rules gauss:1,gauss:2,gauss:1+kinks]
    explaind report TRACE [--result R] [--model ... --inputs ...] [--out DIR]
    explaind demo [--out DIR]

`explaind kernel` writes TRACE.result.explaind (or --out) and prints that path;
`explaind report TRACE` uses that saved result when it fits (same trace, configuration,
test inputs and targets), and says why when it does not. Under `torchrun` (RANK and
WORLD_SIZE set) `explaind kernel` shards the steps across the ranks, exactly;
`torchrun --nproc-per-node N -m explaind_kernel TRACE ...` is the same command.

MODULE is imported from the current directory. Every ExPLAIND error (an ExplaindError)
prints one line on stderr and exits with code 2; --debug shows the traceback instead.
Errors raised by the user's own code are not caught.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explaind_trace.errors import ExplaindError

from ..errors import UsageError
from .options import add_kernel_options, add_model_options, kernel_kwargs

log = logging.getLogger(__name__)

EXIT_LIBRARY_ERROR = 2


# ----------------------------------------------------------------- argument resolution


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, inputs, labels) from --model, --inputs and --labels."""
    from . import loading

    if not args.model or not args.inputs:
        raise UsageError("computing a kernel result needs --model MODULE:FACTORY and --inputs")
    model = loading.load_model(args.model)
    inputs, labels = loading.load_inputs(args.inputs, args.labels)
    if labels is None and hasattr(inputs, "shape") and _needs_labels(args.outputs):
        raise UsageError(
            f"--outputs {args.outputs} needs labels: pass --labels FILE.npy, an .npz with x and "
            "y, or return (inputs, labels) or a Dataset of (x, y) from the --inputs function"
        )
    return model, inputs, labels


def _needs_labels(outputs: str) -> bool:
    from explaind_kernel.targets import resolve_target

    return resolve_target(outputs).needs_labels


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _compute(args: argparse.Namespace) -> Any:
    """The kernel result for the parsed arguments (sharded under torchrun)."""
    model, inputs, labels = _load(args)
    kw = kernel_kwargs(args, labels)
    if _under_torchrun():
        return _compute_sharded(args.trace, model, inputs, kw)
    import explaind_kernel

    return explaind_kernel.compute_kernel(args.trace, model, inputs, **kw)


def _compute_sharded(trace: str, model: Any, inputs: Any, kw: dict[str, Any]) -> Any:
    """compute_kernel_sharded inside a process group set up from torchrun's environment;
    returns the result on rank 0 and None on the others."""
    import torch
    import torch.distributed as dist

    from explaind_kernel.distributed import compute_kernel_sharded

    cuda = torch.cuda.is_available() and kw.get("device") in (None, "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        kw = {**kw, "device": f"cuda:{torch.cuda.current_device()}"}
    elif kw.get("device") is None:
        kw = {**kw, "device": "cpu"}
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        result = compute_kernel_sharded(trace, model, inputs, **kw)
        return result if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def _default_path(trace: str, suffix: str) -> Path:
    return Path(trace.split("://", 1)[-1].rstrip("/\\") + suffix)


def _trace_id(trace: str) -> str:
    from explaind_trace import open_trace

    from ..results import trace_id_of

    with open_trace(trace) as reader:
        return trace_id_of(reader)


def _samples_from_trace(trace: str, ids: Sequence[Any]) -> dict[Any, Any]:
    """Input rows of `ids` read back from the trace, for the report's sample panels."""
    from explaind_trace import open_trace

    from ..report import samples_from_trace

    with open_trace(trace) as reader:
        return samples_from_trace(reader, ids)


# ----------------------------------------------------------------------- subcommands


def _cmd_info(args: argparse.Namespace) -> int:
    from explaind_trace.info import describe, format_info

    model = None
    if args.model:
        from . import loading

        model = loading.load_model(args.model)
    if args.verify:
        from explaind_trace.info import format_verify, verify_error, verify_trace

        report = verify_trace(args.path, model=model)
        print(format_verify(report))
        if not report.ok:
            raise verify_error(report)
    print(format_info(describe(args.path) if model is None else describe(args.path, model=model)))
    return 0


def _cmd_self_influence(args: argparse.Namespace) -> int:
    """explaind kernel TRACE --self-influence: every training sample's contribution to its
    own target, ranked; the table goes to TRACE.self_influence.csv (or --out)."""
    from ..influence import self_influence
    from . import loading

    if not args.model:
        raise UsageError("--self-influence needs --model MODULE:FACTORY")
    model = loading.load_model(args.model)
    labels = loading.load_array(args.labels, "--labels") if args.labels else None
    kw = kernel_kwargs(args, labels)
    kw.pop("outputs"), kw.pop("labels")
    outputs = None if args.outputs == "all" else args.outputs  # None: loss, or predicted
    table, result = self_influence(args.trace, model, outputs=outputs, labels=labels, **kw)
    out = Path(args.out) if args.out else _default_path(args.trace, ".self_influence.csv")
    table.to_csv(out, index=False)
    print(f"self-influence: {out}")
    print(result.completeness_line())
    print(table.head(args.top).to_string(index=False))
    return 0


def _cmd_kernel(args: argparse.Namespace) -> int:
    if args.self_influence:
        return _cmd_self_influence(args)
    if not args.inputs:
        raise UsageError("explaind kernel needs --inputs (or --self-influence)")
    result = _compute(args)
    if result is None:  # a torchrun rank other than 0
        return 0
    out = Path(args.out) if args.out else _default_path(args.trace, ".result.explaind")
    result.save(out)
    print(f"result: {out}")
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


def _problem_digest(trace: str, inputs: Any, labels: Any, outputs: str) -> str:
    from explaind_kernel.inputs import problem_digest
    from explaind_trace import open_trace

    with open_trace(trace) as reader:
        return problem_digest(reader, inputs, outputs=outputs, labels=labels)


def _saved_result(args: argparse.Namespace, path: Path) -> Any:
    """The result saved at `path` when it answers this command's question, else None (saying
    why on stderr). With --model/--inputs: the same trace, kernel configuration, test inputs
    and targets; without them: the same trace (there is nothing else to compare)."""
    from explaind_kernel import KernelConfig
    from explaind_kernel.result import KernelResult

    from ..results import reuse_mismatch

    if not path.is_file():
        return None
    loaded = KernelResult.load(path)
    trace_id = _trace_id(args.trace)
    why = reuse_mismatch(loaded, trace_id=trace_id)
    if why is None and args.model and args.inputs:
        _, inputs, labels = _load(args)
        kw = kernel_kwargs(args, labels)
        kw.pop("outputs"), kw.pop("labels")
        digest = _problem_digest(args.trace, inputs, labels, args.outputs)
        why = reuse_mismatch(loaded, trace_id=trace_id, config=KernelConfig(**kw), digest=digest)
    if why is not None:
        print(f"explaind: note: not using {path}: {why}; computing a new one", file=sys.stderr)
        return None
    return loaded


def _cmd_report(args: argparse.Namespace) -> int:
    from ..report import build_report

    out_dir = Path(args.out) if args.out else _default_path(args.trace, ".report")
    saved = Path(args.result) if args.result else _default_path(args.trace, ".result.explaind")
    result = _saved_result(args, saved)
    if result is None:
        if not args.model or not args.inputs:
            raise UsageError(
                f"no kernel result for {args.trace} at {saved}; computing one needs --model "
                "MODULE:FACTORY and --inputs (or run `explaind kernel` first)"
            )
        result = _compute(args)
        if result is None:  # a torchrun rank other than 0
            return 0
        # never overwrite a result file that is there (it fits other inputs or another trace)
        save_to = out_dir / "result.explaind" if saved.exists() else saved
        save_to.parent.mkdir(parents=True, exist_ok=True)
        result.save(save_to)
        print(f"result: {save_to}")
    else:
        print(f"result: {saved} (saved)")
    samples = _samples_from_trace(args.trace, result.sample_ids)
    inputs = None
    if args.inputs and args.model:  # shown on the explanation cards
        from . import loading

        inputs, _ = loading.load_inputs(args.inputs, None)
        inputs = inputs if hasattr(inputs, "shape") else None
    paths = build_report(
        result, out_dir, samples=samples, inputs=inputs, title=f"ExPLAIND report: {args.trace}"
    )
    print(result.completeness_line())
    print(f"report: {paths.html}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    options: dict[str, Any] = {"quick": args.quick}
    if args.no_progress:
        options["progress"] = False
    if args.cpu_threads is not None:
        options["threads"] = args.cpu_threads
    summary = demo.run_demo(args.out, **options)
    print(f"report: {summary.report}")
    print(
        f"trained {summary.steps} steps (train accuracy {summary.train_accuracy:.2f}, "
        f"test accuracy {summary.test_accuracy:.2f}) in {summary.seconds.get('total', 0.0):.0f} s"
    )
    print(summary.completeness_line)
    return 0


# --------------------------------------------------------------------------- parser


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
    p.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="the traced model: a trace recorded with gradients='recompute' or 'auto' is "
        "then replayed, each gradient recomputed and checked (without it, records only)",
    )
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "kernel",
        parents=[common],
        help="compute and save a kernel result (sharded under torchrun)",
    )
    p.add_argument("trace", metavar="TRACE")
    add_kernel_options(p, required=False)
    p.add_argument(
        "--self-influence",
        action="store_true",
        help="score every training sample's contribution to its own target (the kernel on "
        "the training inputs, read on the diagonal), ranked; --labels FILE.npy indexed by "
        "int sample ids; target: loss with labels, else predicted (or --outputs)",
    )
    p.add_argument("--top", type=int, default=20, help="rows of the ranking to print (20)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="result file (default: TRACE.result.explaind; with --self-influence: "
        "TRACE.self_influence.csv)",
    )
    p.set_defaults(func=_cmd_kernel)

    p = sub.add_parser(
        "quadrature",
        parents=[common],
        help="measure quadrature rules' errors on a trace (cheap: forward-mode JVPs)",
    )
    p.add_argument("trace", metavar="TRACE")
    add_model_options(p, required=True)
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
    add_kernel_options(p, required=False)
    p.add_argument(
        "--result",
        metavar="R",
        help="the saved result to use when it fits TRACE (default: TRACE.result.explaind)",
    )
    p.add_argument("--out", metavar="DIR", help="report directory (default: TRACE.report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", parents=[common], help="run the end-to-end demo")
    p.add_argument("--out", metavar="DIR", default="explaind-demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument(
        "--cpu-threads", type=int, default=None, metavar="N", help="torch threads (default: 1)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for every ExplaindError)."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="explaind: %(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except ExplaindError as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"explaind: error: {message}", file=sys.stderr)
        return EXIT_LIBRARY_ERROR


if __name__ == "__main__":
    sys.exit(main())
