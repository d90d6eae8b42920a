"""`python -m explaind_kernel` / `torchrun --nproc-per-node N -m explaind_kernel`: write a
kernel result file; under torchrun the steps are sharded across the ranks (exactly).

    torchrun --nproc-per-node 2 -m explaind_kernel runs/a.lmdb --model mymod:make_model \
        --inputs test_x.npy --outputs predicted --out runs/a.result.explaind
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from .loading import load_inputs, load_model

log = logging.getLogger("explaind_kernel")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m explaind_kernel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("trace")
    ap.add_argument(
        "--model", required=True, help="MODULE:FACTORY returning a model of the traced architecture"
    )
    ap.add_argument("--inputs", required=True, help="MODULE:FUNCTION or FILE.npy")
    ap.add_argument("--outputs", default="all", choices=["all", "predicted", "label"])
    ap.add_argument("--labels", default=None, help="FILE.npy of class indices (outputs=label)")
    ap.add_argument("--nodes", type=int, default=2, help="Gauss–Legendre nodes per step")
    ap.add_argument(
        "--kink-splits",
        type=int,
        default=0,
        help="split each step at up to this many ReLU-type kinks per input (0: off)",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    inputs, labels = load_inputs(args.inputs, args.labels)
    kw = dict(
        outputs=args.outputs,
        labels=labels,
        quadrature=f"gauss:{args.nodes}",
        kink_splits=args.kink_splits,
        dtype=args.dtype,
        progress=False,
    )
    out = Path(args.out or f"{args.trace.rstrip('/')}.result.explaind")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        from .distributed import compute_kernel_sharded

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
            res = compute_kernel_sharded(args.trace, model, inputs, device=device, **kw)
            if dist.get_rank() == 0:
                res.save(out)
                print(res.completeness_line())
        finally:
            dist.destroy_process_group()
        return 0
    from .engine import compute_kernel

    res = compute_kernel(args.trace, model, inputs, **kw)
    res.save(out)
    print(res.completeness_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
