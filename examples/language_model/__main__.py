"""``python -m examples.language_model``: train (recorded), then explain; see README.md.

python -m examples.language_model --out runs/lm            # a few minutes on 2 CPU cores
python -m examples.language_model --out runs/lm --small    # seconds
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from . import analyze, train


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="train a tiny GPT-2 while recording, then explain")
    p.add_argument("--out", default="runs/language_model", help="run directory")
    p.add_argument("--small", action="store_true", help="the seconds-long configuration")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace")
    p.add_argument("--gradients", default="recompute", help="see train.py --help")
    p.add_argument("--cotangent-codec", default="auto", help="see train.py --help")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    common = ["--no-progress"] if args.no_progress else []
    train_argv = ["--out", args.out, *common, "--gradients", args.gradients]
    train_argv += ["--cotangent-codec", args.cotangent_codec]
    train_argv += ["--small"] if args.small else []
    train_argv += ["--overwrite"] if args.overwrite else []
    analyze_argv = ["--run", args.out, *common]
    if args.small:  # the route and threads pinned: bit-for-bit comparable runs
        analyze_argv += ["--n-explain", "2", "--step-windows", "3"]
        analyze_argv += ["--training-mode", "rules", "--cpu-threads", "1"]
    return {"train": train.main(train_argv), "analyze": analyze.main(analyze_argv)}


if __name__ == "__main__":
    main()
