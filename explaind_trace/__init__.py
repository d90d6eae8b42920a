"""explaind_trace: record any PyTorch training run through hooks, read and replay it exactly.

with explaind_trace.record(model, optimizer, store="runs/a.lmdb"):
    ...  # the unmodified training loop

trace = explaind_trace.open_trace("runs/a.lmdb")
for step in trace.replay():
    step.params, step.next_params, step.record.forwards

Public names are imported on first use (PEP 562), so ``explaind_trace.errors`` -- home of
``ExplaindError``, the base of every ExPLAIND error -- imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import (
    CotangentDecodeError,
    DiskFullError,
    DistributedTraceError,
    ExplaindError,
    GradientMismatchError,
    ModelRequiredError,
    NotATraceError,
    RecordingError,
    SchemaVersionError,
    StoreError,
    TraceCorruptError,
    TraceError,
    TraceExistsError,
    TraceMismatchError,
    TraceWriteError,
    UnsupportedOptimizerError,
)

_LAZY = {
    "cotangent_codec": ("DeferredCotangent",),
    "cotangents": ("resolve_forwards",),
    "optimizers": ("register_optimizer", "supported_optimizers"),
    "options": ("RecordOptions",),
    "reader": ("TraceReader", "open_trace"),
    "recorder": ("Recorder", "record"),
    "records": ("Checkpoint", "ForwardRecord", "SkipRecord", "StepRecord", "TraceMeta"),
    "replay": ("DriftReport", "ReplayStep"),
    "stores": (
        "DirectoryStore",
        "LMDBStore",
        "MemoryStore",
        "Store",
        "available_schemes",
        "open_store",
        "register_store",
    ),
}
_OWNER = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "record",
    "Recorder",
    "RecordOptions",
    "open_trace",
    "TraceReader",
    "TraceMeta",
    "StepRecord",
    "ForwardRecord",
    "SkipRecord",
    "ReplayStep",
    "DeferredCotangent",
    "resolve_forwards",
    "Checkpoint",
    "DriftReport",
    "register_optimizer",
    "supported_optimizers",
    "register_store",
    "open_store",
    "available_schemes",
    "Store",
    "LMDBStore",
    "MemoryStore",
    "DirectoryStore",
    "errors",
    "ExplaindError",
    "TraceError",
    "RecordingError",
    "UnsupportedOptimizerError",
    "StoreError",
    "TraceExistsError",
    "DiskFullError",
    "NotATraceError",
    "SchemaVersionError",
    "TraceCorruptError",
    "TraceMismatchError",
    "CotangentDecodeError",
    "TraceWriteError",
    "DistributedTraceError",
    "GradientMismatchError",
    "ModelRequiredError",
]


def __getattr__(name: str) -> Any:
    module = _OWNER.get(name)
    if module is None:
        raise AttributeError(f"module 'explaind_trace' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .cotangent_codec import DeferredCotangent
    from .cotangents import resolve_forwards
    from .optimizers import register_optimizer, supported_optimizers
    from .options import RecordOptions
    from .reader import TraceReader, open_trace
    from .recorder import Recorder, record
    from .records import Checkpoint, ForwardRecord, SkipRecord, StepRecord, TraceMeta
    from .replay import DriftReport, ReplayStep
    from .stores import (
        DirectoryStore,
        LMDBStore,
        MemoryStore,
        Store,
        available_schemes,
        open_store,
        register_store,
    )
