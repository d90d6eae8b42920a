"""Process-wide torch settings a computation runs under, set for its duration and restored.

One place for the settings that are global to the process rather than to a tensor: torch's
intra-op thread count (small models on few cores run much faster on one thread) and TF32 for
CUDA matmuls and convolutions (off unless asked: fp32 means fp32). `compute_kernel`, the sharded
path, `compare_quadrature` and the demo all enter `torch_runtime`, so they run alike.

>>> with torch_runtime("cpu", cpu_threads=1):
...     result = compute(...)

`auto_cpu_threads` picks the count for `cpu_threads="auto"` (the kernel's default). On a busy
machine — other processes' runnable threads now (/proc/loadavg) enough that one of torch's
threads would share a core; where there is no /proc, a one-minute load average above the
threads torch would use, less the one this process adds — it keeps one thread without
measuring: each of the kernel's many small
operations waits for its slowest thread, and a thread that shares its core with another
process makes that wait a time slice (measured on 2 busy cores: 2 threads 8.5× slower than 1
on the bench's small Transformer). Otherwise a short calibration (about 0.1 s, once per shape
and process) times the kernel's typical operations — an elementwise pass and a matrix product
over [rows, parameters] — on one thread and on all of them, and keeps one thread unless all
are clearly (20%) faster: small per-op work does not pay for the threads' synchronisation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_CHOSEN: dict[tuple[int, int, int], int] = {}


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


def _time_ops(threads: int, rows: int, params: int, repeats: int = 3) -> float:
    """Best-of-`repeats` time of the calibration ops on `threads` threads."""
    old = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, params, generator=g)
    b = torch.randn(params, generator=g)
    w = torch.randn(params, 64, generator=g)
    best = float("inf")
    try:
        torch.set_num_threads(threads)
        for _ in range(repeats):
            t0 = time.perf_counter()
            c = torch.addcmul(a, a, b)
            c.mul_(0.5)
            c @ w
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return best


def _load_average() -> float | None:
    """The one-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _others_running(samples: int = 5) -> int | None:
    """Threads of other processes running or runnable now: the kernel's count of runnable
    threads (/proc/loadavg, fourth field) less this thread, the least of a few readings 1 ms
    apart; None where there is no /proc/loadavg. Unlike the load average, it does not hold
    this process's own work of the last minute (a kernel run right after training or after
    another run would otherwise see a busy machine)."""
    least = None
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        least = running if least is None else min(least, running)
        if i + 1 < samples:
            time.sleep(0.001)
    return max(0, least - 1)


def _busy(most: int) -> str | None:
    """Why the machine counts as busy for `most` threads (another process would share a
    core with one of them), or None."""
    others = _others_running()
    if others is not None:
        return f"{others} other runnable thread(s)" if others > most - 2 else None
    load = _load_average()  # it includes the one this process adds
    return f"load average {load:.2f}" if load is not None and load > most - 1 else None


def auto_cpu_threads(rows: int, params: int) -> int:
    """The intra-op thread count for CPU work on [rows, params] tensors (see module docs)."""
    most = torch.get_num_threads()
    if most <= 1:
        return 1
    busy = _busy(most)
    if busy is not None:
        log.info("cpu_threads=auto: 1 (machine busy: %s on %d threads)", busy, most)
        return 1
    rows = max(1, min(int(rows), 512))
    params = max(1, min(int(params), 16384))
    key = (rows, params, most)
    if key not in _CHOSEN:
        one, many = _time_ops(1, rows, params), _time_ops(most, rows, params)
        _CHOSEN[key] = most if many < 0.8 * one else 1
        log.info(
            "cpu_threads=auto: %d (calibration on [%d, %d]: 1 thread %.2f ms, %d threads %.2f ms)",
            _CHOSEN[key], rows, params, 1e3 * one, most, 1e3 * many,
        )  # fmt: skip
    return _CHOSEN[key]


def resolve_cpu_threads(setting: int | str | None, rows: int, params: int) -> int | None:
    """An int for `cpu_threads` ("auto" calibrated by `auto_cpu_threads`; None: as is)."""
    if setting == "auto":
        return auto_cpu_threads(rows, params)
    return None if setting is None else int(setting)


__all__ = ["auto_cpu_threads", "resolve_cpu_threads", "torch_runtime"]
