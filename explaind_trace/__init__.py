"""explaind_trace: record any PyTorch training run through hooks, read and replay it exactly.

with explaind_trace.record(model, optimizer, store="runs/a.lmdb"):
    ...  # the unmodified training loop

trace = explaind_trace.open_trace("runs/a.lmdb")
for step in trace.replay():
    step.params, step.next_params, step.record.forwards
"""

from . import errors
from .errors import (
    DistributedTraceError,
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
from .optimizers import register_optimizer, supported_optimizers
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

__all__ = [
    "record",
    "Recorder",
    "open_trace",
    "TraceReader",
    "TraceMeta",
    "StepRecord",
    "ForwardRecord",
    "SkipRecord",
    "ReplayStep",
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
    "TraceError",
    "RecordingError",
    "UnsupportedOptimizerError",
    "StoreError",
    "TraceExistsError",
    "NotATraceError",
    "SchemaVersionError",
    "TraceCorruptError",
    "TraceMismatchError",
    "TraceWriteError",
    "DistributedTraceError",
]
