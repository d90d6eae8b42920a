"""Suite-wide settings.

The test models are tiny: on this 2-core CI machine, OpenMP intra-op threads cost more than they
bring (measured 4x slower for a 200-step kernel on an MLP, worse with the prefetch thread), so
the suite runs torch single-threaded. Results do not depend on it (CPU kernels are deterministic
for a fixed thread count, and the tests compare against references computed in the same process).
"""

from __future__ import annotations

import logging

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)


#: log messages of a fast path abandoned because it raised. A bug in a layer rule, a seeded
#: pass or the cotangent codec shows only as one of these (the kernel stays exact on the
#: slower route, the trace lossless with the generic codec: a buffer bug of cf6c786 hid that
#: way), so a test that logs one fails unless it is marked ``fallback`` (it exercises the
#: fallback, or its model needs it). Fallbacks because a check disagreed, or because
#: torch.func cannot transform a model, are not listed.
FALLBACKS = (
    "per-row layer rules failed",
    "the per-row rules could not be checked",
    "batched per-sample gradients failed",
    "batched output tangents failed",
    "backward over all explained outputs at once failed",
    "the cotangent codec failed",
)
_LOGGERS = ("explaind_kernel", "explaind_trace")


class _Fallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(f in text for f in FALLBACKS):
            self.seen.append(text)


@pytest.fixture(autouse=True)
def _no_silent_fallback(request: pytest.FixtureRequest):
    handler = _Fallbacks()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    if handler.seen and request.node.get_closest_marker("fallback") is None:
        pytest.fail(
            "a fast path was abandoned because it raised (mark the test "
            "@pytest.mark.fallback if it means to): " + "; ".join(handler.seen[:3]),
            pytrace=False,
        )
