"""Process-wide torch settings a computation runs under, set for its duration and restored.

One place for the settings that are global to the process rather than to a tensor: torch's
intra-op thread count (small models on few cores run much faster on one thread) and TF32 for
CUDA matmuls and convolutions (off unless asked: fp32 means fp32). `compute_kernel`, the sharded
path, `compare_quadrature` and the demo all enter `torch_runtime`, so they run alike.

>>> with torch_runtime("cpu", cpu_threads=1):
...     result = compute(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_runtime(
    device: torch.device | str | None = None,
    *,
    cpu_threads: int | None = None,
    allow_tf32: bool | None = None,
) -> Iterator[None]:
    """Run the block with `cpu_threads` intra-op threads (when computing on CPU; None leaves the
    count as is) and TF32 allowed or not for CUDA matmuls and cuDNN convolutions (None leaves
    the flags as they are; they touch CUDA kernels only, so they are set whatever `device` is).
    Everything is restored on exit, also when the block raises."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    threads = cpu_threads if dev.type == "cpu" else None
    old_threads = torch.get_num_threads()
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        if allow_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
            torch.backends.cudnn.allow_tf32 = bool(allow_tf32)
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
        torch.backends.cudnn.allow_tf32 = old_cudnn
        if threads is not None:
            torch.set_num_threads(old_threads)


__all__ = ["torch_runtime"]
