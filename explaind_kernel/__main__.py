"""`python -m explaind_kernel TRACE ...` is `explaind kernel TRACE ...`, the one command line
(explaind_attr.app.cli); under `torchrun --nproc-per-node N -m explaind_kernel TRACE ...` the
steps are sharded across the ranks, exactly.

    torchrun --nproc-per-node 2 -m explaind_kernel runs/a.lmdb --model mymod:make_model \
        --inputs test_x.npy --outputs predicted --out runs/a.result.explaind
"""

from __future__ import annotations

import sys

# The entry point delegates upward on purpose: the command line is the application layer
# (tests/test_layering.py names this file as the one allowed exception).
from explaind_attr.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["kernel", *sys.argv[1:]]))
