"""Errors raised by explaind_trace. Each message says what happened, why, and what to do."""

from __future__ import annotations

__all__ = [
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


class ExplaindError(Exception):
    """The one base class of every error ExPLAIND raises (trace, kernel, attributions,
    integrations). Each package re-exports it; catch it to handle any ExPLAIND failure."""


class TraceError(ExplaindError):
    """Base class of every error explaind_trace raises."""


class RecordingError(TraceError):
    """The training loop does something the recorder cannot capture faithfully."""


class UnsupportedOptimizerError(RecordingError):
    """The optimizer's class (or one of its settings) has no registered support: neither
    recording/replay nor the kernel's adjoint rule. The one such error of the library; the
    kernel and the integrations raise and re-export this same class."""


class StoreError(TraceError):
    """A store cannot be opened, read or written."""


class TraceExistsError(StoreError):
    """A trace already exists where a new one was to be written."""


class DiskFullError(StoreError):
    """The filesystem holding a store has no space left; the message says "disk full"."""


class NotATraceError(StoreError):
    """The location exists but does not hold an ExPLAIND trace."""


class SchemaVersionError(StoreError):
    """The trace was written by a newer schema than this library reads."""


class TraceCorruptError(StoreError):
    """A stored record does not decode (wrong dtype, truncated bytes, bad structure)."""


class CotangentDecodeError(TraceCorruptError):
    """A cotangent stored by the cross-entropy codec does not rebuild bit for bit from the
    replayed logits (they differ from the recorded ones, or the record is damaged)."""


class TraceMismatchError(TraceError):
    """A model or value does not match what the trace recorded."""


class TraceWriteError(TraceError):
    """The background writer failed; steps committed before the failure stay readable."""


class DistributedTraceError(StoreError):
    """The per-rank stores of a DDP trace are missing or disagree (names the rank)."""


class GradientMismatchError(TraceMismatchError):
    """A gradient recomputed from the recorded forwards (``gradients="recompute"``) is not
    the one the optimizer saw at that step (names the step, the parameter, the likely cause)."""


class ModelRequiredError(TraceError):
    """Replaying a trace recorded with ``gradients="recompute"`` (or ``"auto"``) needs the
    traced model, to recompute each step's gradient; none was given."""
