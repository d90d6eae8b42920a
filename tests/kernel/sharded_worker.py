"""One rank of a sharded kernel run for the tests (launched by torchrun; not a test module).

    python -m torch.distributed.run --nproc-per-node 2 -m tests.kernel.sharded_worker \
        TRACE TEST_X.npy OUT.explaind

Runs `compute_kernel_sharded` in float64 with every KeepOptions field on, and rank 0 saves
the result. The model is tests.kernel.test_sharded:make_model.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from explaind_kernel import KeepOptions
from explaind_kernel.distributed import compute_kernel_sharded

from .test_sharded import make_model

KEEP_ALL = KeepOptions(
    sample_component=True, sample_window=True, component_window=True, param_scores=True
)


def main(argv: list[str]) -> int:
    trace, x_path, out = argv
    torch.set_num_threads(1)
    test_x = torch.from_numpy(np.load(x_path, allow_pickle=False))
    dist.init_process_group("gloo")
    try:
        res = compute_kernel_sharded(
            trace, make_model(), test_x, dtype="float64", keep=KEEP_ALL, progress=False
        )
        if dist.get_rank() == 0:
            res.save(out)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
